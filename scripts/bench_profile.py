"""Cost of the deviation profile relative to plain forward passes, and K/V/E bytes per token.

    python scripts/bench_profile.py [--pair tiny] [--examples 10] [--repeats 3]

For each profiling example: (a) one plain forward pass of the receiver and one of the sender over
the shared context (the cheapest thing any profiler must do), and (b) what the deviation profile
does (capture K/V/E of both models + per-layer deviation and attention-output cosines). Both are
timed in the same run after a warm-up, medians over repeats; goal: (b)/(a) <= 2.5. Also checks the
bytes of K, V and E per token per layer against the analytic formula from the model config.
Writes results/bench_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ds_study import deviation, runner
from ds_study.caches import analytic_bytes_per_token
from ds_study.executor import capture


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="tiny")
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench_profile.json")
    args = ap.parse_args()
    if args.repeats < 1 or args.examples < 1:
        ap.error("--repeats and --examples must be >= 1")
    with initialize_config_dir(str(runner.CONF_DIR), version_base="1.3"):
        cfg = compose("profile", overrides=[f"model_pair={args.pair}", f"limit={args.examples}"])
    task = runner.validate(cfg)
    pair = runner.load_pair_from(cfg)
    examples = runner.prepare(pair, task, runner.records_of(cfg, task), cfg.max_length)
    r, s = pair.receiver, pair.sender

    def plain():
        for ex in examples:
            ids = torch.tensor([ex.prompt.prefix_ids])
            r(input_ids=ids)
            s(input_ids=ids)

    def profile():
        for ex in examples:
            sc, rc = capture(s, ex.prompt.prefix_ids), capture(r, ex.prompt.prefix_ids)
            deviation.layer_deviation(r, rc, sc)

    plain(), profile()  # warm-up
    t_plain = statistics.median(timed(plain) for _ in range(args.repeats))
    t_prof = statistics.median(timed(profile) for _ in range(args.repeats))

    cache = capture(r, examples[0].prompt.prefix_ids)
    dtype_bytes = cache.keys[0].element_size()
    analytic = analytic_bytes_per_token(r.config, dtype_bytes)
    measured = {k: cache.bytes_per_token(k) for k in ("k", "v", "e")}
    result = {
        "command": f"python scripts/bench_profile.py --pair {args.pair} --examples {args.examples} --repeats {args.repeats}",
        "pair": args.pair, "examples": len(examples),
        "mean_context_tokens": round(sum(e.prompt.n_prefix for e in examples) / len(examples), 1),
        "plain_forward_both_models_s": round(t_plain, 4), "deviation_profile_s": round(t_prof, 4),
        "ratio": round(t_prof / t_plain, 3), "goal_ratio_max": 2.5,
        "bytes_per_token_per_layer": {"measured": measured, "analytic": analytic,
                                      "match": all(measured[k] == analytic[k] for k in measured)},
        "e_over_one_layer_kv": analytic["e"] / (analytic["k"] + analytic["v"]),
        "env": runner.environment(cfg.device),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=2))


if __name__ == "__main__":
    main()
