"""Does in-context copying (induction) form within the CPU budget? A probe for zoo recipes.

    python scripts/induction_probe.py FRACTION SEQ BATCH STEPS LR [TOP_TOKENS] [HEADS] [KV_HEADS]
    python scripts/induction_probe.py 0.5 256 16 400 2e-3      # the run in results/zoo_probe/
    python scripts/induction_probe.py 1.0 64 64 300 2e-3 512 4 1   # short rows, frequent tokens, head dim 32

Trains the zoo's model shape from scratch on the pretraining corpus (first 400 files), with
FRACTION of the rows replaced by a random-token segment repeated to fill the row, the cleanest
signal for copying. Every 50 steps it prints (one JSON line): the loss on the second copy of random
32-token sequences shown twice (any tokens of the vocabulary) (ln 4096 = 8.32 means no copying at all), the mean NLL of the first two answer
tokens of 16 pyqa profiling prompts (the function name, which the question states 10 tokens
earlier) and of all answer tokens.
"""
import gzip, math, sys, time, json
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from omegaconf import OmegaConf
from ds_study import zoo, data
torch.set_num_threads(2); torch.manual_seed(0)
frac, seq, bs, steps, lr = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
top = int(sys.argv[6]) if len(sys.argv) > 6 else 0  # random tokens from the TOP most frequent ones (0: all)
cfg = OmegaConf.load(zoo.CONF_DIR / 'zoo.yaml')
if len(sys.argv) > 8:
    cfg.model.num_attention_heads, cfg.model.num_key_value_heads = int(sys.argv[7]), int(sys.argv[8])
tok = AutoTokenizer.from_pretrained(zoo.ZOO_DIR / 'base')
text = gzip.open(zoo.CORPUS, 'rt').read()
ids = []
for enc in tok(text.split("\n\n# file: ")[:400], add_special_tokens=False)["input_ids"]:
    ids.extend(enc + [tok.eos_token_id])
train = torch.tensor(ids)
pool = torch.bincount(train).argsort(descending=True)[:top] if top else torch.arange(3, tok.vocab_size)
print('tokens', len(train), 'random-token pool', len(pool), 'heads', cfg.model.num_attention_heads,
      cfg.model.num_key_value_heads, flush=True)
g = torch.Generator().manual_seed(0)
model = LlamaForCausalLM(zoo.model_config(cfg, tok))
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
task = data.TASKS['pyqa']
probe = []
for r in data.load_records('pyqa', 'profile')[:16]:
    p = data.build_prompt(r, task, tok, 1024)
    name = r['answers'][0].split('(')[0]
    a = tok(' ' + r['answers'][0], add_special_tokens=False)['input_ids']
    probe.append((p.input_ids, a))
def evaluate():
    model.eval(); out = []
    with torch.no_grad():
        for pi, a in probe:
            lp = model(torch.tensor([pi + a])).logits[0].log_softmax(-1)
            n = len(pi)
            out.append([-lp[n - 1 + i, t].item() for i, t in enumerate(a)])
        # synthetic copy loss
        x = torch.randint(3, tok.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1)); x = torch.cat([x, x], 1)
        lp = model(x).logits.log_softmax(-1)
        cl = -lp[:, 32:-1].gather(-1, x[:, 33:, None]).mean().item()
    model.train()
    name_nll = sum(sum(o[:2]) / 2 for o in out) / len(out)  # first two answer tokens (the name, copied from the question)
    all_nll = sum(sum(o) / len(o) for o in out) / len(out)
    return round(cl, 3), round(name_nll, 3), round(all_nll, 3)
t0 = time.time()
for step in range(steps):
    warm = 30
    cur = lr * (step + 1) / warm if step < warm else lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm))))
    for gr in opt.param_groups: gr['lr'] = cur
    starts = torch.randint(0, len(train) - seq, (bs,), generator=g)
    x = torch.stack([train[s:s + seq] for s in starts])
    for r in range(bs):
        if torch.rand((), generator=g).item() < frac:
            x[r] = zoo.repeated_segments(pool, 1, seq, g)[0]  # same draws, in the same order, as before
    loss = model(input_ids=x, labels=x).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    if step % 50 == 0 or step == steps - 1:
        print(json.dumps({'step': step, 'loss': round(loss.item(), 3), 's': round(time.time() - t0), 'copy_nll,name_nll,ans_nll': evaluate()}), flush=True)
