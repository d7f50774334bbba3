"""Measurements of the serving engine, one module per benchmark; ``scripts/bench_*.py`` are their
command lines and results/engine/ holds what they wrote:

- ``ttft``     TTFT vs quality, vs link bandwidth, the Fig. 13 timeline and one request's spans (CPU);
- ``gpu``      the pipelined engine on a Llama-3-8B-shaped model with KV in host memory (CUDA);
- ``loaders``  how much a loader slows the computation beside it (thread vs link worker process).
"""
