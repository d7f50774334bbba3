"""Try model-family recipes quickly (ideally on a GPU) before committing to a 30-minute CPU build.

    python scripts/zoo_sweep.py --device cuda --recipes current copy copy_lr --limit 40
    python scripts/zoo_sweep.py --device cpu --recipes tiny_smoke --limit 2      # CPU smoke test

Each recipe is a list of Hydra overrides of ds_study/conf/zoo.yaml. The script builds the whole family per
recipe (a base is reused between recipes whose tokenizer/model/pretraining settings agree), then
scores each embedded pair's receiver and sender on the pair's task (profile split, the first
``--limit`` examples) with the same evaluator as profiling. It reports the training positions each
recipe computes, the CPU cost driver, next to the scores, so a recipe can be chosen that meets the
quality floors within the CPU build budget. One JSON line per recipe on stdout and in ``--out``.
Scores from a GPU build are indicative only: the committed family is built on CPU, whose float
results differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ds_study import pairs as pair_table
from ds_study import runner, zoo

HD32 = ["model.num_attention_heads=4", "model.num_key_value_heads=1"]  # head dim 32, same size, GQA 4:1
HD32_4X = [*HD32, "pretrain.copy_fraction=0.5", "pretrain.steps=1800"]  # plus copy rows, 4x the pretraining
RECIPES = {
    "current": [],
    "copy": ["pretrain.copy_fraction=0.5"],
    "copy_lr": ["pretrain.copy_fraction=0.5", "variants.qa.lr=2e-3", "variants.code.lr=2e-3"],
    "copy_short": ["pretrain.copy_fraction=0.5", "pretrain.seq_len=256", "pretrain.batch_size=16"],
    "copy_2x": ["pretrain.copy_fraction=0.5", "pretrain.steps=900"],
    "copy_4x": ["pretrain.copy_fraction=0.5", "pretrain.steps=1800"],
    "qa_swap": ["variants.qa.swap_params=1.0", "~variants.sum", "~variants.code"],
    "qa_swap_300": ["variants.qa.swap_params=1.0", "variants.qa.steps=300", "~variants.sum", "~variants.code"],
    "qa_swap_half": ["variants.qa.swap_params=0.5", "~variants.sum", "~variants.code"],
    # Next: head dim 32 (4 query heads, 1 KV head: same parameter count and GQA 4:1) and longer
    # pretraining; then a wider model (head dim 32, 4x the parameters: 4 such models exceed the 40 MB
    # committed-family limit in float32, so this one bounds what width alone buys).
    "hd32_4x": HD32_4X,
    "hd32_16x": [*HD32, "pretrain.copy_fraction=0.5", "pretrain.steps=7200"],
    # the hd32_4x base, then 3x the QA fine-tune on contexts whose signatures carry other functions'
    # parameters (the answer can only be copied from the passage); run after hd32_4x to reuse its base
    "hd32_4x_qaswap450": [*HD32_4X, "variants.qa.swap_params=1.0", "variants.qa.steps=450", "~variants.sum",
                          "~variants.code"],
    "wide256_4x": ["model.hidden_size=256", "model.intermediate_size=768", "pretrain.copy_fraction=0.5",
                   "pretrain.steps=1800"],
    "wide256_16x": ["model.hidden_size=256", "model.intermediate_size=768", "pretrain.copy_fraction=0.5",
                    "pretrain.steps=7200"],
    # A first pretraining phase on repeated random segments (zoo.copy_phase): with head dim 32 the
    # probe learned copying after about 1000 such steps (results/zoo_probe/*_heads4_kv1.jsonl).
    "hd32_copyphase": [*HD32, "pretrain.copy_phase.steps=1500"],
    "hd32_copyphase_4x": [*HD32, "pretrain.copy_phase.steps=1500", "pretrain.steps=1800"],
    "hd32_copyphase_noqa": [*HD32, "pretrain.copy_phase.steps=1500", "~variants.qa"],  # code and sum pairs only (CPU-affordable)
    "tiny_smoke": ["pretrain.copy_fraction=0.5", "pretrain.steps=2", "pretrain.val_batches=1", "variants.qa.steps=2",
                   "variants.sum.steps=2", "variants.code.steps=2", "finetune_val_examples=2",
                   "tokenizer.vocab_size=600", "pretrain.copy_phase.steps=2"],
}
PAIRS = [("code", "qa", "pycode"), ("code", "base", "pycode"), ("qa", "code", "pyqa"), ("qa", "base", "pyqa"),
         ("sum", "base", "pysum")]


def recipe_cfg(overrides: list[str], device: str, threads: int):
    return runner.compose("zoo", [*overrides, f"device={device}", f"threads={threads}"], conf_dir=zoo.CONF_DIR)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["current", "copy"], choices=sorted(RECIPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--work", default="outputs/zoo_sweep", help="where the families are built")
    ap.add_argument("--out", default="results/zoo_sweep.jsonl")
    args = ap.parse_args(argv)
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipes {unknown}; known: {sorted(RECIPES)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}  # base recipe -> a built family with that base
    for name in args.recipes:
        cfg = recipe_cfg(RECIPES[name], args.device, args.threads)
        base_key = json.dumps({k: OmegaConf.to_container(cfg, resolve=True).get(k) for k in zoo.BASE_RECIPE_KEYS},
                              sort_keys=True)
        out = Path(args.work) / name
        if out.exists():
            shutil.rmtree(out)
        if base_key in built:  # same base recipe: copy it and let build() reuse it
            shutil.copytree(built[base_key] / "base", out / "base")
            shutil.copy(built[base_key] / zoo.MANIFEST, out / zoo.MANIFEST)
            cfg.reuse_base = True
        t0 = time.time()
        manifest = zoo.build(cfg, out)
        build_s = time.time() - t0
        built.setdefault(base_key, out)
        positions = manifest["variants"]["base"]["train_tokens"] + sum(
            v.get("train_positions", 0) for k, v in manifest["variants"].items() if k != "base")
        t1 = time.time()
        pairs = [p for p in PAIRS if p[0] in manifest["variants"] and p[1] in manifest["variants"]]
        rows = pair_table.score_family(out, args.device, args.limit, pairs)
        rec = {"recipe": name, "overrides": RECIPES[name], "device": args.device, "build_s": round(build_s, 1),
               "eval_s": round(time.time() - t1, 1), "train_positions": positions,
               "losses": {k: {m: v.get(m) for m in ("final_train_loss", "val_loss")} for k, v in manifest["variants"].items()},
               "pairs": rows}
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        summary = "  ".join(f"{r['receiver']}<-{r['sender']} {r['receiver_score']:.1f}/{r['sender_score']:.1f}" for r in rows)
        print(f"# {name}: {positions / 1e6:.2f} M positions, build {build_s:.0f} s | {summary}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
