"""What a serving run reports, in the shape of ``vllm bench serve``: TTFT, TPOT, ITL and E2E (mean,
median, p90, p99), throughput, and goodput at a TTFT SLO, per role; one record per request.

Definitions (all times from the request's arrival, in seconds in the records, ms in the summary):
TTFT = first token - arrival; E2E = last token - arrival; TPOT = (E2E - TTFT) / (tokens - 1) per
request; ITL = every gap between consecutive tokens; throughput = requests (or output tokens)
completed per second of the run's makespan (first arrival to last token); goodput = requests whose
TTFT met the SLO per second of the same makespan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    """One served request: when it arrived, started, and produced each token, and how it was served."""

    name: str
    role: str
    context: int
    replica: int
    strategy: str  # what was asked for
    served_as: str  # what ran: the strategy, or "full_prefill" after a fallback
    plan: str
    arrival: float
    prefill_start: float = 0.0
    token_times: list[float] = field(default_factory=list)  # first token's included
    token_ids: list[int] = field(default_factory=list)
    n_prompt_tokens: int = 0
    fallback: str | None = None
    reason: str | None = None
    repaired_plan: str | None = None
    rejected: list[str] = field(default_factory=list)
    bytes_loaded: int = 0

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return None if n < 2 else (self.token_times[-1] - self.token_times[0]) / (n - 1)

    @property
    def itl(self) -> list[float]:
        return np.diff(self.token_times).tolist()

    def to_json(self) -> dict:
        return asdict(self) | {"ttft": self.ttft, "e2e": self.e2e, "tpot": self.tpot}


STATS = ("mean", "median", "p90", "p99")


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {k: None for k in STATS}
    a = np.asarray(xs, dtype=float) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(records: list[RequestRecord], slo_ttft_s: float) -> dict:
    """The run's figures per role ("receiver", "sender") and over all requests ("all")."""
    if not records:
        raise ValueError("no requests were served")
    start = min(r.arrival for r in records)
    makespan = max(r.token_times[-1] for r in records) - start
    out = {"makespan_s": makespan, "slo_ttft_s": slo_ttft_s}
    for role in ("receiver", "sender", "all"):
        rs = [r for r in records if role in ("all", r.role)]
        if not rs:
            continue
        met = sum(r.ttft <= slo_ttft_s for r in rs)
        out[role] = {
            "requests": len(rs), "output_tokens": sum(len(r.token_times) for r in rs),
            "fallbacks": sum(r.fallback is not None for r in rs),
            "repaired": sum(r.repaired_plan is not None for r in rs),
            "ttft_ms": _stats([r.ttft for r in rs]), "tpot_ms": _stats([r.tpot for r in rs if r.tpot is not None]),
            "itl_ms": _stats([x for r in rs for x in r.itl]), "e2e_ms": _stats([r.e2e for r in rs]),
            "request_throughput": len(rs) / makespan if makespan > 0 else None,
            "output_throughput": sum(len(r.token_times) for r in rs) / makespan if makespan > 0 else None,
            "slo_attainment": met / len(rs), "goodput": met / makespan if makespan > 0 else None,
        }
    return out


def table(summary: dict, title: str) -> str:
    """A fixed-format table of one run (as ``vllm bench serve`` prints), receiver requests first."""
    w = 50
    lines = [f"{' ' + title + ' ':=^{w}}", f"{'Makespan (s):':<36}{summary['makespan_s']:>14.2f}",
             f"{'TTFT SLO (ms):':<36}{summary['slo_ttft_s'] * 1e3:>14.0f}"]
    for role in ("receiver", "sender", "all"):
        s = summary.get(role)
        if s is None:
            continue
        lines.append(f"{' ' + role + ' requests ':-^{w}}")
        lines += [f"{'Requests (fallbacks, repaired):':<36}{s['requests']:>6} ({s['fallbacks']}, {s['repaired']})",
                  f"{'Request throughput (req/s):':<36}{s['request_throughput']:>14.3f}",
                  f"{'Output token throughput (tok/s):':<36}{s['output_throughput']:>14.2f}",
                  f"{'Goodput at the TTFT SLO (req/s):':<36}{s['goodput']:>14.3f}",
                  f"{'SLO attainment:':<36}{s['slo_attainment']:>14.1%}"]
        for metric in ("ttft", "tpot", "itl", "e2e"):
            st = s[f"{metric}_ms"]
            if st["mean"] is None:
                continue
            lines.append(f"{metric.upper() + ' (ms) mean / median / p90 / p99:':<36}"
                         + " ".join(f"{st[k]:.0f}" for k in STATS).rjust(w - 36))
    lines.append("=" * w)
    return "\n".join(lines)
