"""The serving workload: which requests arrive when (Poisson or gamma arrivals, as ``vllm bench serve``).

Every context brings two requests: the sender's, which prefills it and publishes its KV/E, and
the receiver's on the same context ``delay_s`` later, which may reuse them. The same seed gives
the same workload to every strategy, so their reports are paired.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ServeRequest:
    """One request to the server."""

    name: str
    role: str  # "sender" (prefills the context, publishes its cache) | "receiver" (may reuse it)
    context: int  # which context: the sender and receiver requests of one context share it
    prefix_ids: list[int]
    suffix_ids: list[int]
    arrival: float  # seconds after the run starts
    max_new_tokens: int
    replica: int = 0  # the sender replica holding this context's cache
    eos: set = field(default_factory=set)  # empty: fixed output length (ignore end-of-sequence)


def arrival_times(rate: float, n: int, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """``n`` arrival times at ``rate`` per second: gamma inter-arrival times of shape ``burstiness``
    (1: a Poisson process; below 1 burstier, above 1 more regular), mean 1/rate, first at 0."""
    if not rate > 0 or n < 1 or not burstiness > 0:
        raise ValueError(f"need rate > 0, n >= 1 and burstiness > 0 (got rate={rate}, n={n}, burstiness={burstiness})")
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def paired_requests(prompts: list, rate: float, n_contexts: int, delay_s: float, max_new_tokens: int,
                    burstiness: float = 1.0, seed: int = 0, replicas: int = 1, eos=()) -> list[ServeRequest]:
    """A sender request per context at the arrival times, and the receiver's ``delay_s`` after it.
    Contexts cycle through ``prompts`` (``data.Prompt``); replicas take contexts round-robin, as the
    paper's router does."""
    if not prompts:
        raise ValueError("the workload needs at least one prompt")
    out = []
    for i, t in enumerate(arrival_times(rate, n_contexts, burstiness, seed)):
        p = prompts[i % len(prompts)]
        for role, at in (("sender", t), ("receiver", t + delay_s)):
            out.append(ServeRequest(f"{role[0]}{i}", role, i, list(p.prefix_ids), list(p.suffix_ids), at,
                                    max_new_tokens, i % replicas, set(eos)))
    return sorted(out, key=lambda r: (r.arrival, r.role != "sender"))
