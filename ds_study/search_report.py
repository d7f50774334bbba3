"""What a search prints and the markdown it writes: tables for people, beside the CSV/JSON files for programs.

``ds_study.search`` computes and writes result files; this module only formats them, so a search's
console summary and ``greedy_vs_exhaustive.md`` can change without touching what is measured.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_comparison_md(out_root: Path) -> Path:
    """Gather every greedy_vs_exhaustive_<pair>_<dataset>.csv into one markdown table."""
    import pandas as pd

    lines = ["# Greedy vs exhaustive profiling", "",
             "Best quality with at most k recomputed layers on each pair's profiling split (its size in each section); "
             "`diff` = greedy - exhaustive (quality points); `SE` = standard error of that difference "
             "over the examples (paired), i.e. how large a gap the choice of examples alone produces. "
             "Held-out columns score the same plans on examples neither search saw (`search.holdout_split`). "
             "Evaluations count distinct plans, each scored on every profiling example. "
             "Ranking reliability: the Spearman correlation between the plans' rankings on two random halves "
             "of the profiling examples (median and 5th-95th percentile over 200 splits, all exhaustive plans); "
             "near 0, the profiled ranking is noise and the exhaustive frontier a noise maximum.", ""]
    for csv in sorted(Path(out_root).glob("greedy_vs_exhaustive_*.csv")):
        meta = json.loads(csv.with_suffix(".json").read_text()) if csv.with_suffix(".json").exists() else {}
        df = pd.read_csv(csv)
        lines += [f"## {meta.get('pair', csv.stem)} ({meta.get('sender', '?')} -> {meta.get('receiver', '?')}, "
                  f"{meta.get('dataset', '?')}, {meta.get('metric', '')})", "",
                  (f"{meta['n_examples']} profiling examples. " if "n_examples" in meta else "")
                  + f"Evaluations: greedy {meta.get('greedy_evaluations')} vs exhaustive "
                  f"{meta.get('exhaustive_evaluations')} ({meta.get('evaluation_ratio', float('nan')):.0%}); "
                  f"largest shortfall {meta.get('max_shortfall')} points"
                  + (f" on the profiling split, {meta['max_shortfall_holdout']} on {meta['holdout']['n_examples']} "
                     f"held-out `{meta['holdout']['split']}` examples" if "holdout" in meta else "")
                  + (". Ranking reliability {spearman_median:.2f} [{spearman_p05:.2f}, {spearman_p95:.2f}]".format(
                      **meta["ranking_reliability"])
                     if (meta.get("ranking_reliability") or {}).get("spearman_median") is not None
                     else ". Ranking reliability undefined (every plan scores the same)" if meta.get("ranking_reliability")
                     else "")
                  + f". Command: `{meta.get('command', '')}`", ""]
        held = "diff_holdout" in df.columns
        lines += ["| k | exhaustive plan | exhaustive | greedy plan | greedy | diff | SE |"
                  + (" held-out exh. | held-out greedy | held-out diff | SE |" if held else ""),
                  "|---|---|---|---|---|---|---|" + ("---|---|---|---|" if held else "")]
        for r in df.itertuples():
            lines.append(f"| {r.k} | {r.exhaustive_plan} | {r.exhaustive:.2f} | {r.greedy_plan} | {r.greedy:.2f} | "
                         f"{r.diff:+.2f} | {getattr(r, 'se', float('nan')):.2f} |"
                         + (f" {r.exhaustive_holdout:.2f} | {r.greedy_holdout:.2f} | {r.diff_holdout:+.2f} | "
                            f"{r.se_holdout:.2f} |" if held else ""))
        lines.append("")
    path = Path(out_root) / "greedy_vs_exhaustive.md"
    path.write_text("\n".join(lines))
    return path


def _interval(r: dict | None) -> str:
    if not r or r.get("spearman_median") is None:
        return "undefined"
    return f"{r['spearman_median']:.2f} [{r['spearman_p05']:.2f}, {r['spearman_p95']:.2f}]"


def print_exhaustive(summary: dict, g: int, n_layers: int, n_examples: int, base: float, label: str) -> None:
    """The frontier of one exhaustive grid (best plan with k layers, best within <= k) and how well
    the profiling split ranks its plans under each target."""
    print(f"\nfrontier, exhaustive g={g} ({summary['evaluations']} plans x {n_examples} examples; "
          f"full prefill {base:.2f} {label})")
    print(f"  {'k':>3}  {'best plan with k layers':<26}{'score':>8}  {'best with <= k':<26}{'score':>8}")
    for r in summary["frontier"]:
        ps = f"{r['plan']:<26}{r['score']:>8.2f}" if r["plan"] else f"{'-':<26}{'':>8}"
        bs = r["budget_score"] if r["budget_plan"] else float("nan")
        print(f"  {r['k']:>3}  {ps}  {r['budget_plan'] or '-':<26}{bs:>8.2f}")
    if summary.get("reliability"):
        print("  plan-ranking reliability (split-half Spearman, median [5%, 95%]) by target: "
              + "; ".join(f"{t} {_interval(r)}" for t, r in summary["reliability"].items()))


def print_comparison(c: dict) -> None:
    """Greedy against exhaustive at every budget, with the paired SE and held-out columns."""
    rel = c.get("ranking_reliability")
    print(f"\ngreedy vs exhaustive (g={c['granularity']}): {c['greedy_evaluations']} vs {c['exhaustive_evaluations']} "
          f"plans evaluated ({c['evaluation_ratio']:.0%}); largest shortfall {c['max_shortfall']} points"
          + ("" if not rel or rel.get("spearman_median") is None
             else f"; plan-ranking reliability (split-half Spearman) {_interval(rel)}"))
    print(f"  {'k':>3}  {'exhaustive':<24}{'score':>8}  {'greedy':<24}{'score':>8}{'diff':>8}{'SE':>7}")
    for r in c["table"]:
        print(f"  {r['k']:>3}  {r['exhaustive_plan']:<24}{r['exhaustive']:>8.2f}  {r['greedy_plan']:<24}"
              f"{r['greedy']:>8.2f}{r['diff']:>+8.2f}{r['se']:>7.2f}"
              + (f"   held-out {r['exhaustive_holdout']:.2f} vs {r['greedy_holdout']:.2f} "
                 f"({r['diff_holdout']:+.2f} +- {r['se_holdout']:.2f})" if "holdout" in c else ""))


def print_selections(result: dict, sc, base: float, label: str) -> None:
    """The selected plan per delta, for each method run, and the critical layers."""
    print(f"\nselected recompute plans ({sc.delta_mode} delta, full prefill {base:.2f} {label}):")
    for method in ("exhaustive", "greedy"):
        if method not in result:
            continue
        sels = (result[method][min(result[method])]["selected"] if method == "exhaustive"
                else result[method]["selected"])
        src = f"exhaustive g={min(result[method])}" if method == "exhaustive" else "greedy"
        for s in sels:
            print(f"  {src:<15} delta {s['delta']:g}: {s['plan']} ({s['k']} layers recomputed, {s['score']} "
                  f">= {s['threshold']})")
    if "sensitivity" in result:
        sens = result["sensitivity"]
        print(f"\ncritical layers (single-layer reuse drops {label} by more than {sc.critical_threshold:g} "
              f"{sc.critical_mode}): {sens['critical_layers']}")
        print("  per-layer " + label + ": " + " ".join(f"{i}:{s:.1f}" for i, s in zip(sens["layers"], sens["layer_scores"])))
