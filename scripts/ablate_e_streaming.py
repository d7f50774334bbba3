"""Interleaved ablation of the engine's E streaming and GIL switch interval on the CPU benchmark pair.

    python scripts/ablate_e_streaming.py        # plan 2-3, 3 contexts, 8 rounds, at 20 and 0.2 Gbit/s

Each round runs every setting (e_chunk_tokens 0 / 64 x gil_switch_s default / 2e-4) on every
context, so drift in machine load hits all settings alike; prints the median pipelined TTFT (ms)
per setting. The numbers quoted in docs/engine.md came from this script.
"""
import statistics
import types

import torch

from ds_study import serving as engine
from ds_study.link import Link
from ds_study.serving.bench import ttft as B
torch.set_num_threads(1)
args = types.SimpleNamespace(receiver="zoo:code", sender="zoo:qa", task="pycode", examples=3, random=False,
                             random_tokens=768, receiver_b="zoo:qa", loader="auto")
S = B.load_setup(args)
orig = engine.Engine.__init__
def one(gbps, chunk, gil, i):
    def init(self, *a, **k):
        k.setdefault("e_chunk_tokens", chunk); k.setdefault("gil_switch_s", gil); orig(self, *a, **k)
    engine.Engine.__init__ = init; B.Engine = engine.Engine
    t = B.run(S, i, "2-3", "pipelined", Link(gbps, 0.0, 1 << 16)).ttft
    engine.Engine.__init__ = orig
    return t * 1e3
cfgs = [(0, None), (64, None), (0, 2e-4), (64, 2e-4)]
for gbps in (20, 0.2):
    res = {c: [] for c in cfgs}
    for rep in range(8):
        for c in cfgs:
            for i in range(3):
                res[c].append(one(gbps, *c, i))
    for c in cfgs:
        print(gbps, c, round(statistics.median(res[c]), 1), flush=True)
