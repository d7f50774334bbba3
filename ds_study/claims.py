"""The claims table: each finding of the paper, what this toolkit measured on each pair, and a verdict.

    python -m ds_study.claims                      # writes results/claims.md from the committed result files
    python -m ds_study.claims --results DIR --out FILE

Built from result files only (never from a model run), like the figures: the pair table
(``results/pairs_smol.json``), the study's per-pair files (``results/study/<pair>/...``) and the
published searches (``results/search/<pair>/<task>/search.json``). A finding whose files are not
there yet says so, with the command that makes them. Verdicts:

- **agree** / **disagree**: the measurement (with its interval where it has one) is on one side;
- **not resolved**: the interval spans the paper's claim, or the pairs disagree among themselves;
- **not measured yet**: the result files are missing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

PAIRS = ("smol_sum_code", "smol_sum", "smol_qa", "smol_code", "smol_qa_code")
TASK = {"smol_sum_code": "pysum", "smol_sum": "pysum", "smol_qa": "pyqa", "smol_code": "pycode", "smol_qa_code": "pyqa"}
STUDY = "python -m ds_study.study model_pair={pair} study.publish=true"
PROFILE = ("python -m ds_study.profile --config-name profile_full model_pair={pair} search.method=both "
           "search.granularity=[1,2] search.greedy_granularity=2 search.holdout_split=test search.publish=true")


@dataclass
class Claim:
    finding: str  # the paper's finding, as the paper notes state it
    measure: Callable[[Path, str], str | None]  # (results root, pair) -> what was measured, or None (no files)
    verdict: Callable[[list[str | None], Path], str]  # measurements of every pair -> verdict
    command: str


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# Measurements, one per finding


def _pair_row(root: Path, pair: str) -> dict | None:
    table = _json(root / "pairs_smol.json") or {"pairs": []}
    return next((r for r in table["pairs"] if r["pair"] == pair), None)


def full_reuse(root: Path, pair: str) -> str | None:
    r = _pair_row(root, pair)
    if r is None:
        return None
    m, lo, hi = (100 * x for x in r["reuse_minus_receiver"])
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] of {100 * r['receiver_score'][0]:.1f} ({-m / (100 * r['receiver_score'][0]):.0%} of the points)"


def _loss_fraction(root: Path, pair: str) -> float | None:
    r = _pair_row(root, pair)
    return None if r is None else -r["reuse_minus_receiver"][0] / r["receiver_score"][0]


def critical_share(root: Path, pair: str) -> str | None:
    s = _json(root / "study" / pair / TASK[pair] / "sensitivity.json")
    if s is None:
        return None
    parts = []
    for t, r in (s.get("by_target") or {"task": {"critical_layers": s["critical_layers"]}}).items():
        parts.append(f"{t}: {len(r['critical_layers'])}/{s['n_layers']} {r['critical_layers']}")
    return "; ".join(parts) + f" (n={s['n_examples']})"


def stability(root: Path, pair: str) -> str | None:
    s = _json(root / "study" / pair / TASK[pair] / "sensitivity.json")
    if s is None or "stability" not in s:
        return None
    return ("; ".join(f"{t}: {r['spearman_median']} [{r['spearman_p05']}, {r['spearman_p95']}]"
                      for t, r in s["stability"].items() if r.get("spearman_median") is not None) or "undefined") \
        + f" (n={s['n_examples']})"


def _twins(root: Path, pair: str) -> list[dict] | None:
    """Propagation plans with several groups that have a contiguous twin of the same recompute count."""
    s = _json(root / "study" / pair / TASK[pair] / "propagation.json")
    if s is None:
        return None
    return [p for p in s["plans"] if p.get("contiguous_twin") and p.get("out_err_minus_twin")]


def contiguity(root: Path, pair: str) -> str | None:
    twins = _twins(root, pair)
    if twins is None:
        return None
    if not twins:
        return "no equal-count comparison in the result (rerun the propagation job)"
    return "; ".join(f"{p['groups']} ({p['transitions']} transitions) - {p['contiguous_twin'].split(':', 1)[-1]}: "
                     f"output error {p['out_err_minus_twin'][0]:+.3f} [{p['out_err_minus_twin'][1]:+.3f}, "
                     f"{p['out_err_minus_twin'][2]:+.3f}]" for p in twins)


def granularity(root: Path, pair: str) -> str | None:
    s = _json(root / "search" / pair / TASK[pair] / "search.json")
    if s is None or not {"1", "2"} <= set(s.get("exhaustive", {})):
        return None
    e1, e2 = s["exhaustive"]["1"], s["exhaustive"]["2"]
    b1 = [r["budget_score"] for r in e1["frontier"]]
    b2 = [r["budget_score"] for r in e2["frontier"]]
    gap = max(x - y for x, y in zip(b1, b2) if x is not None and y is not None)
    return f"{e1['evaluations']} vs {e2['evaluations']} plans ({e1['evaluations'] / e2['evaluations']:.1f}x); largest frontier gap {gap:.1f}"


def transfer(root: Path, pair: str) -> str | None:
    p = root / "study" / pair / "transfer.csv"
    if not p.is_file():
        return None
    df = pd.read_csv(p)
    cross = df[df.source != df.target]
    return f"gap mean {cross.gap.abs().mean():.1f}, max {cross.gap.abs().max():.1f} points"


def selected(root: Path, pair: str) -> str | None:
    s = _json(root / "search" / pair / TASK[pair] / "search.json")
    if s is None or "exhaustive" not in s:
        return None
    g = min(s["exhaustive"], key=int)
    rel = ((s["exhaustive"][g].get("reliability") or {}).get(s.get("target", "task")) or {}).get("spearman_median")
    return ("; ".join(f"delta {x['delta']:g}: {x['k']}/{s['n_layers']}" for x in s["exhaustive"][g]["selected"])
            + f" (by {s.get('target', 'task')}, n={s['n_examples']}"
            + (f", plan-ranking reliability {rel:.2f})" if rel is not None else ")"))


def greedy_goal(root: Path, pair: str) -> str | None:
    m = _json(root / "search" / f"greedy_vs_exhaustive_{pair}_{TASK[pair]}.json")
    if m is None:
        return None
    rel = m.get("ranking_reliability") or {}
    out = (f"{m['greedy_evaluations']}/{m['exhaustive_evaluations']} evaluations; shortfall {m['max_shortfall']:.1f} "
           f"on profile (n={_json(root / 'search' / pair / TASK[pair] / 'search.json')['n_examples']}, reliability "
           f"{rel.get('spearman_median')})")
    if "holdout" in m:
        out += f", {m['max_shortfall_holdout']:.1f} on {m['holdout']['n_examples']} held-out"
    return out


def label_free(root: Path, pair: str) -> str | None:
    s = _json(root / "study" / pair / TASK[pair] / "sensitivity.json")
    if s is None or "prediction" not in s:
        return None
    return "; ".join(f"{t}: {s['prediction']['attn'][t]:+.2f}" for t in s["prediction"]["attn"])


def prior_savings(root: Path, pair: str) -> str | None:
    s = _json(root / "study" / pair / TASK[pair] / "prior_search.json")
    if s is None:
        return None
    parts = []
    for t in ("kl", "nll"):
        pr = s["targets"][t]["priors"]
        show = lambda r: "never" if r["evaluations"] is None else str(r["evaluations"])  # noqa: E731
        rnd = pr["random (median of seeds)"]
        parts.append(f"{t}: attn {show(pr['attn'])}, v_dev {show(pr['v_dev'])}, random priors reach it in "
                     f"{rnd['reached']} seeds")
    return "; ".join(parts) + f" of {s['exhaustive_evaluations']} (min walk {s['smallest_walk']})"


# --------------------------------------------------------------------------------------------
# Verdicts


def _missing(ms) -> bool:
    return all(m is None for m in ms)


def verdict_full_reuse(ms, root: Path) -> str:
    fr = [f for f in (_loss_fraction(root, p) for p in PAIRS) if f is not None]
    if not fr:
        return "not measured yet"
    big = sum(f > 0.5 for f in fr)
    return (f"agree ({big} of {len(fr)} pairs lose more than half)" if big > len(fr) / 2
            else f"disagree: {big} of {len(fr)} pairs lose more than half; at most {max(fr):.0%} of the points")


def verdict_measured(ms, root: Path) -> str:
    return "not measured yet" if _missing(ms) else "see measurements (no single threshold in the paper)"


def _sensitivities(root: Path) -> list[dict]:
    return [s for s in (_json(root / "study" / p / TASK[p] / "sensitivity.json") for p in PAIRS) if s is not None]


def _stable(s: dict, target: str) -> bool | None:
    """Whether the per-layer ranking under ``target`` is reliable (split-half Spearman 5th percentile
    >= 0.7), unreliable (95th percentile < 0.7), or neither (None)."""
    r = (s.get("stability") or {}).get(target) or {}
    if r.get("spearman_p05") is None:
        return None
    return True if r["spearman_p05"] >= 0.7 else False if r["spearman_p95"] < 0.7 else None


def verdict_critical(ms, root: Path) -> str:
    sens = _sensitivities(root)
    if not sens:
        return "not measured yet"
    parts = []
    for t in ("task", "kl"):
        usable = [s for s in sens if _stable(s, t) and t in s.get("by_target", {"task": 0})]
        if usable:
            share = sum(len(s["by_target"][t]["critical_layers"]) / s["n_layers"] for s in usable) / len(usable)
            parts.append(f"{t}: {share:.0%} critical on {len(usable)} pair(s) with a stable layer ranking")
        else:
            parts.append(f"{t}: no pair where this signal ranks layers reliably")
    shares = [len(s["by_target"]["kl"]["critical_layers"]) / s["n_layers"] for s in sens
              if _stable(s, "kl") and "by_target" in s]
    if shares and all(x < 0.05 for x in shares):
        return "disagree (" + "; ".join(parts) + ")"
    if shares and all(0.05 <= x <= 0.2 for x in shares):
        return "agree (" + "; ".join(parts) + ")"
    return "not resolved (" + "; ".join(parts) + ")"


def verdict_stability(ms, root: Path) -> str:
    sens = _sensitivities(root)
    if not any("stability" in s for s in sens):
        return "not measured yet"
    kl = [_stable(s, "kl") for s in sens if "stability" in s]
    task = [_stable(s, "task") for s in sens if "stability" in s]
    note = ("; the task metric cannot rank layers on these examples" if all(t is False for t in task)
            else "")
    if all(k is True for k in kl):
        return "agree under KL (layer ranking split-half >= 0.7 on every measured pair)" + note
    if all(k is False for k in kl):
        return "disagree (KL layer ranking below 0.7 on every measured pair)" + note
    return "not resolved" + note


def verdict_contiguity(ms, root: Path) -> str:
    """Agree where every equal-count comparison's paired interval puts the groups' output error above
    the contiguous group's; disagree where every one puts it below; otherwise not resolved."""
    diffs = [p["out_err_minus_twin"] for pr in PAIRS for p in (_twins(root, pr) or [])]
    if not diffs:
        return "not measured yet"
    if all(lo > 0 for _, lo, _ in diffs):
        return f"agree: several groups carry more output error than one group of as many layers ({len(diffs)} of {len(diffs)} comparisons)"
    if all(hi < 0 for _, _, hi in diffs):
        return f"disagree: several groups carry less output error ({len(diffs)} of {len(diffs)} comparisons)"
    return f"not resolved: {sum(lo > 0 for _, lo, _ in diffs)} of {len(diffs)} comparisons favour one group beyond noise"


def verdict_greedy(ms, root: Path) -> str:
    metas = [m for m in (_json(root / "search" / f"greedy_vs_exhaustive_{p}_{TASK[p]}.json") for p in PAIRS) if m]
    if not metas:
        return "not measured yet"
    held = [m for m in metas if "holdout" in m]
    if not held:
        return (f"not judged: no held-out check yet ({len(metas)} pair(s) profiled; the goal is judged on the 200 "
                f"held-out test examples)")
    ok = [m["max_shortfall_holdout"] <= 1.0 and m["evaluation_ratio"] <= 0.25 for m in held]
    return (f"{'holds' if all(ok) else 'does not hold'} on {sum(ok)} of {len(held)} pair(s) with a held-out check"
            + (f"; {len(metas) - len(held)} without" if len(metas) > len(held) else ""))


def verdict_label_free(ms, root: Path) -> str:
    rhos = [s["prediction"]["attn"]["kl"] for s in _sensitivities(root) if "prediction" in s and _stable(s, "kl")]
    if not rhos:
        return "not measured yet"
    return (f"attention-output cosine vs KL sensitivity: Spearman {min(rhos):+.2f}..{max(rhos):+.2f} on {len(rhos)} "
            f"pair(s) (reference r ~ 0.57)")


def verdict_savings(ms, root: Path) -> str:
    ss = [s for s in (_json(root / "study" / p / TASK[p] / "prior_search.json") for p in PAIRS) if s]
    if not ss:
        return "not measured yet"
    wins = [s for s in ss if s["targets"]["kl"]["priors"]["attn"]["evaluations"] is not None]
    return (f"under KL the attention prior reaches the exhaustive frontier on {len(wins)} of {len(ss)} pair(s) "
            f"(one-group walk, replayed over committed cells)")


CLAIMS = [
    Claim("Full reuse loses more than half of the accuracy points on most pairs (Fig. 6)", full_reuse,
          verdict_full_reuse, "python -m ds_study.pairs --out results/pairs_smol"),
    Claim("About 11% of layers are critical: reusing one layer's KV drops quality by more than 10% (Fig. 7)",
          critical_share, verdict_critical, STUDY),
    Claim("Critical layers are stable across inputs (Fig. 8): split-half reliability of the per-layer ranking",
          stability, verdict_stability, STUDY),
    Claim("One contiguous group beats groups with transitions (Fig. 10): output error at an equal recompute count, "
          "paired",
          contiguity, verdict_contiguity, STUDY),
    Claim("2-layer granularity costs about 3x less with a similar frontier (§3.2)", granularity, verdict_measured,
          PROFILE),
    Claim("Profiles transfer across datasets: frontier gaps of at most 4, 2 on average (Fig. 17)", transfer,
          verdict_measured, STUDY),
    Claim("Selected plans recompute few layers (11 of 32 within 5% for glue_sst2/conllpp)", selected,
          verdict_measured, PROFILE),
    Claim("Goal (issue 15): greedy within 1 point of the exhaustive frontier at every budget with <= 25% of its "
          "evaluations, on held-out examples", greedy_goal, verdict_greedy, PROFILE),
    Claim("Beyond the paper: single-layer sensitivity predicted without labels (Spearman of attention-output "
          "cosine with the measured drop, per target)", label_free, verdict_label_free, STUDY),
    Claim("Beyond the paper: evaluations a prior-seeded greedy needs to reach the exhaustive frontier (within 1 "
          "point)", prior_savings, verdict_savings,
          "python -m ds_study.prior_search --pair {pair} --publish"),
]


def build(root: Path) -> str:
    head = "| paper finding | " + " | ".join(PAIRS) + " | verdict | command |"
    lines = [head, "|" + "---|" * (len(PAIRS) + 3)]
    for c in CLAIMS:
        ms = [c.measure(root, p) for p in PAIRS]
        cells = [m if m is not None else "not measured yet" for m in ms]
        cmd = c.command.format(pair="PAIR")
        lines.append(f"| {c.finding} | " + " | ".join(cells) + f" | {c.verdict(ms, root)} | `{cmd}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", help="results root holding pairs_smol.json, study/, search/")
    ap.add_argument("--out", default=None, help="markdown file (default: <results>/claims.md)")
    a = ap.parse_args(argv)
    root = Path(a.results)
    if not root.is_dir():
        ap.error(f"no results directory {root}; pass --results DIR")
    text = ("Built by `python -m ds_study.claims` from the result files under `results/` (never from a model "
            "run). Intervals are bootstrap 95% over examples; differences are paired.\n\n" + build(root) + "\n")
    out = Path(a.out) if a.out else root / "claims.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
