"""GPU benchmark of the pipelined engine: a Llama-3-8B-shaped random-weight model, KV in host memory.

    python scripts/bench_gpu_pipeline.py                       # cuda, llama3-8b shape, 4K/8K/16K tokens
    python scripts/bench_gpu_pipeline.py --plans 28-31,22-25 --breakdown   # two plans, per-phase times
    python scripts/bench_gpu_pipeline.py --device cpu --shape tiny --tokens 128,256   # CPU smoke test

The sender's per-layer KV and the transition E live in pinned host memory (the "remote" store). The
receiver recomputes the last ``--recompute`` layers (or each group of ``--plans``) from E and reuses
the rest, with the engine's real path: a loader thread issues host-to-device copies on a side CUDA
stream (E first, then KV in layer order), each arrival records a CUDA event, and the final prompt
pass (per-layer CUDA graphs unless ``--suffix-graphs off``) makes its stream wait on each layer's
event just before it attends to it. ``--breakdown`` also times each compute phase alone: the
recompute group, and the suffix pass eager (transformers' mask, lower-right bias) and graphed. A
paced link (e.g. 100 Gbit/s) throttles the issue of 4 MB chunks: a chunk is copied only once the link could have delivered it.

Printed per context length: full prefill (one pass over the prompt, and the engine's own full
prefill), (b) load-then-compute and (c) pipelined TTFT per link, the bound max(compute, load) with
compute = the same request with all items already on the GPU and load = bytes / link rate (the
measured host-to-device bandwidth for "host"), and the ratios. One JSON object per line on stdout;
the human-readable table on stderr; everything also in ``--out``. Timings: warm-up then
``--reps`` measured repetitions, median; on CUDA, synchronized before each start and at the first
token. Goals (issue "Reference pipelined engine"): at 8K tokens with 4 of 32 layers recomputed,
pipelined >= 5x faster than full prefill from host memory, >= 3.1x at 100 Gbit/s, within 15% of the bound.
"""

from __future__ import annotations

import argparse
import sys

from ds_study.records import command_line
from ds_study.serving.bench import gpu
from ds_study.serving.bench.gpu import SHAPES


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tokens", default="4096,8192,16384")
    p.add_argument("--suffix", type=int, default=32, help="prompt tokens after the shared context")
    p.add_argument("--recompute", type=int, default=4, help="recompute the last N layers (unless --plans)")
    p.add_argument("--plans", default=None,
                   help="comma-separated recompute groups, e.g. 28-31,22-25 (default: the last --recompute layers)")
    p.add_argument("--suffix-graphs", choices=("on", "off"), default=None,
                   help="final prompt pass as per-layer CUDA graphs (default: on for cuda, off for cpu)")
    p.add_argument("--no-overlap", action="store_true",
                   help="with graphs on CUDA, do not run the final pass's early layers beside the recomputation")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each compute phase alone (recompute, suffix pass with and without the mask)")
    p.add_argument("--links", default="host,100", help="'host' (unpaced) and/or Gbit/s values")
    p.add_argument("--chunk-mb", type=float, default=4.0, help="chunk size of paced links")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--h2d-mb", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sync-debug", action="store_true", help="list where a request makes the host wait for the GPU")
    p.add_argument("--out", default="results/engine/gpu_pipeline.json")
    args = p.parse_args(argv)
    return gpu.run(args, command_line(sys.argv if argv is None else ["scripts/bench_gpu_pipeline.py", *argv]))


if __name__ == "__main__":
    main()
