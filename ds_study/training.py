"""How both model families are trained: the loop, the validation loss and the fine-tuning examples.

The tiny fixture (``ds_study.zoo``) is pretrained and fine-tuned, the smol adapters
(``ds_study.smol_build``) fine-tuned, with the same AdamW loop (warmup, cosine decay to a tenth,
clipping) on the same supervised examples: an embedded task's evaluation prompt followed by its
answer, with optional packing of more questions about the same context and swapped pyqa
signatures. Kept apart from both so that building one family does not import the other.
"""

from __future__ import annotations

import math
import random

import torch


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, batches, steps: int, lr: float, warmup: int, weight_decay: float, desc: str) -> list[float]:
    """``steps`` AdamW steps on ``batches(step)`` -> (input_ids, labels, mask), learning rate warmed
    up then cosine-decayed to a tenth, gradients clipped to norm 1; the loss of every step."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup)
        input_ids, labels, mask = batches(step)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def mean_loss(model, batch_list) -> float:
    """The mean loss over (input_ids, labels, mask) batches, in eval mode."""
    model.eval()
    vals = [model(input_ids=i, attention_mask=m, labels=l).loss.item() for i, l, m in batch_list]
    return sum(vals) / len(vals)


SIGNATURE_LINE = r"^Signature: (\w+)\((.*)\)$"


def context_questions(task_name: str, record: dict) -> list[tuple[str, str]]:
    """Other (input, answer) pairs the same context answers: every passage of a pyqa context, every
    documented function of a pysum context (none for pycode)."""
    import ast
    import re

    if task_name == "pyqa":
        return [(f"What is the signature of the function {name}?", f"{name}({params})")
                for name, params in re.findall(SIGNATURE_LINE, record["context"], re.M)]
    if task_name == "pysum":
        try:
            tree = ast.parse(record["context"])
        except SyntaxError:
            return []
        out = []
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            summary = " ".join(doc.strip().split("\n")[0].split()) if doc else ""
            if 4 <= len(summary.split()) <= 20:
                out.append((node.name, summary))
        return out
    return []


def with_swapped_params(record: dict, rng: random.Random, param_lists: list[str]) -> dict:
    """A pyqa record whose every passage signature carries another function's parameter list.

    Real stdlib functions recur across training contexts, so a small model can answer a signature
    question from memory of the training set instead of reading the passage, and then fails on
    the test pool's unseen functions. Giving each training context's functions random (real)
    parameter lists, with the answer following the passage, removes that shortcut: only reading
    the passage predicts the answer. Names and passages stay real text.
    """
    import re

    swapped: dict[str, str] = {}

    def sub(m):
        swapped[m.group(1)] = rng.choice(param_lists)
        return f"Signature: {m.group(1)}({swapped[m.group(1)]})"

    context = re.sub(SIGNATURE_LINE, sub, record["context"], flags=re.M)
    name = record["answers"][0].split("(", 1)[0]
    if name not in swapped:
        return record
    return {**record, "context": context, "answers": [f"{name}({swapped[name]})"]}


def finetune_examples(tokenizer, task_name: str, split: str, max_length: int, pack: int = 1, seed: int = 0,
                      loss_on: str = "answer", swap_params: float = 0.0):
    """(input_ids, labels) per record: the evaluation prompt, the answer and EOS (answer-only loss).

    With ``pack > 1`` the same context is followed by up to ``pack - 1`` further questions about it
    (suffix, answer, EOS each): the first question is exactly the evaluation format, and each extra
    one adds supervised tokens for the price of a few more positions instead of a whole context.
    ``loss_on="all"`` also trains on the prompt tokens (continued pretraining on the task's text,
    as code models are fine-tuned on whole files). ``swap_params``: fraction of pyqa records given
    swapped parameter lists (see with_swapped_params).
    """
    import re
    from ds_study.data import TASKS, build_prompt, load_records
    from ds_study.data import answer_ids as gold_ids

    task = TASKS[task_name]

    def answer_ids(answer: str) -> list[int]:
        return gold_ids(tokenizer, task, answer)

    records = load_records(task_name, split)
    swap = task_name == "pyqa" and swap_params
    param_lists = sorted({p for r in records for _, p in re.findall(SIGNATURE_LINE, r["context"], re.M)}) if swap else []
    swap_rng = random.Random(seed + 7)
    out = []
    for k, rec in enumerate(records):
        if swap and swap_rng.random() < swap_params:
            rec = with_swapped_params(rec, swap_rng, param_lists)
        prompt = build_prompt(rec, task, tokenizer, max_length)
        ans = answer_ids(rec["answers"][0])
        ids, labels = prompt.input_ids + ans, [-100] * len(prompt.input_ids) + ans
        extra = [qa for qa in context_questions(task_name, rec) if qa != (rec["input"], rec["answers"][0])]
        random.Random(seed * 100_003 + k).shuffle(extra)
        for question, answer in extra[: pack - 1]:
            suffix = tokenizer(task.suffix_template.format(input=question, context=""), add_special_tokens=False)["input_ids"]
            ans = answer_ids(answer)
            if len(ids) + len(suffix) + len(ans) > max_length:
                break
            ids, labels = ids + suffix + ans, labels + [-100] * len(suffix) + ans
        out.append((ids, ids if loss_on == "all" else labels))
    return out


def collate(examples, pad_id: int, device: str):
    """(input_ids, labels) examples -> right-padded (input_ids, labels, attention_mask) on ``device``."""
    n = max(len(i) for i, _ in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for r, (i, lab) in enumerate(examples):
        ids[r, : len(i)], labels[r, : len(i)], mask[r, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids.to(device), labels.to(device), mask.to(device)
