"""How much the engine's loader slows the computation beside it: why the CPU loader is a process.

    python scripts/bench_loader_contention.py                # about 1 min on 2 cores

Recomputes one group (layers 2-3 of the embedded receiver over one pycode context, from the
sender's E, every input in memory) while the engine's own loader moves items over a paced link:
the store loader thread (``Engine(loader="thread")``) or the link worker process (the default on
CPU), each moving a queue of pipelined requests' items (E, then the reused layers' KV, checksummed
in flight) in 64 KiB chunks, at 0.2 Gbit/s (a chunk every 2.6 ms, the CPU benchmarks' link) and at
0.8 Gbit/s (every 0.65 ms). Settings are interleaved round by round, and the queue is long enough
to keep the link busy for every recomputation of a round (checked: ``link_busy_throughout``). Prints
each setting's median recompute time and its ratio to the same recomputation with no loader.
Results: results/engine/loader_contention.json (ds_study.serving.bench.loaders).
"""

from __future__ import annotations

import argparse
import os

from ds_study.serving.bench import loaders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--receiver", default="zoo:code")
    p.add_argument("--sender", default="zoo:qa")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=6, help="recomputations per setting and round")
    p.add_argument("--out", default=os.path.relpath(loaders.RESULT))
    args = p.parse_args()
    if args.rounds < 1 or args.reps < 1:
        p.error("--rounds and --reps must be >= 1")
    out = loaders.contention(args.receiver, args.sender, args.rounds, args.reps, args.out)
    for r in out["results"]:
        print(f"{r['setting']:>30}: {r['median_ms']:6.2f} ms  x{r['ratio_to_none']:.3f}"
              f"{'' if r['link_busy_throughout'] else '  (link went idle during a round)'}")


if __name__ == "__main__":
    main()
