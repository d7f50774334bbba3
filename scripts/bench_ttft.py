"""CPU benchmarks of the reference engine (ds_study.serving) on the embedded model pair.

    python scripts/bench_ttft.py quality    # TTFT vs quality per plan and strategy (paper Fig. 14)
    python scripts/bench_ttft.py bandwidth  # TTFT vs link bandwidth, strategies a/b/c + full prefill (Fig. 20)
    python scripts/bench_ttft.py timeline   # Fig. 13: unit-cost simulation and a measured two-request run
    python scripts/bench_ttft.py spans      # where the time of one pipelined request goes, layer by layer
    python scripts/bench_ttft.py figures    # every figure, from the result files only (python -m ds_study.figures)
    python scripts/bench_ttft.py all

Results go to results/engine/*.json (+ .csv summaries, per-example samples .jsonl), figures to
paper_figures/. What each measures and how (medians after a warm-up, the bound max(compute, load),
the paced link): ds_study.serving.bench.ttft, which this command line calls.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ds_study.serving.bench import ttft

ROOT = Path(__file__).resolve().parents[1]
FIGS = ROOT / "paper_figures"


def cmd_figures() -> None:
    """Every figure, from the result files only: ``python -m ds_study.figures`` (fig13_timeline,
    fig14_ttft_quality and fig20_bandwidth read results/engine)."""
    from ds_study import figures

    figures.main(["--results", os.path.relpath(ROOT / "results"), "--out", os.path.relpath(FIGS)])


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse bad numbers and impossible plans before any model is loaded or context captured."""
    from ds_study.plans import parse_plan

    for flag in ("examples", "reps", "threads", "chunk_bytes", "random_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.gbps > 0 or args.latency_ms < 0:
        p.error(f"--gbps must be > 0 and --latency-ms >= 0, got {args.gbps} and {args.latency_ms}")
    try:
        sweep = [float(x) for x in args.sweep.split(",")]
    except ValueError:
        sweep = []
    if not sweep or any(not x > 0 for x in sweep):
        p.error(f"--sweep must be comma-separated bandwidths > 0 in Gbit/s, got {args.sweep!r}")
    n = ttft.receiver_layers(args)
    for plan in (args.plans.split(";") if args.plans else ttft.DEFAULT_PLANS) + [args.plan]:
        try:
            parse_plan(plan, n)
        except ValueError as e:
            p.error(f"plan {plan!r}: {e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("quality", "bandwidth", "timeline", "spans", "figures", "all"))
    p.add_argument("--receiver", default="zoo:code", help="default: ds_study/conf/model_pair/tiny.yaml")
    p.add_argument("--sender", default="zoo:qa")
    p.add_argument("--receiver-b", default="zoo:qa", help="timeline: the second receiver (B; the committed timeline runs used zoo:sum, no longer in the fixture)")
    p.add_argument("--task", default="pycode")
    p.add_argument("--examples", type=int, default=8, help="test examples (quality) / contexts (bandwidth)")
    p.add_argument("--reps", type=int, default=3, help="measured repetitions per point (after a warm-up)")
    p.add_argument("--plans", default=None, help="quality: ';'-separated plans (default: a 2-layer-granular set)")
    p.add_argument("--plan", default="2-3", help="bandwidth, spans: the plan (2 of 8 layers; quality >= full prefill)")
    p.add_argument("--gbps", type=float, default=0.2, help="quality, spans: link bandwidth, Gbit/s")
    p.add_argument("--sweep", default="0.02,0.05,0.1,0.2,0.5,1,2,5,20", help="bandwidth: Gbit/s values")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--chunk-bytes", type=int, default=1 << 16)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--loader", default="auto", choices=("auto", "process", "thread"),
                   help="what moves the items: the link worker process (auto on CPU) or a loader thread")
    p.add_argument("--random", action="store_true", help="random-weight models of the zoo's shape (timing only)")
    p.add_argument("--random-tokens", type=int, default=768)
    p.add_argument("--out", default=None, help="result file stem (default per command)")
    args = p.parse_args()
    if args.command != "figures":
        check_args(p, args)
    torch.set_num_threads(args.threads)
    if args.command in ("quality", "all"):
        ttft.quality(args)
    if args.command in ("bandwidth", "all"):
        ex = args.examples
        args.examples = min(ex, 3) if args.command == "all" else ex
        ttft.bandwidth(args)
        args.examples = ex
    if args.command in ("timeline", "all"):
        ttft.timeline(args)
    if args.command == "spans":
        ttft.spans(args)
        return
    cmd_figures()


if __name__ == "__main__":
    main()
