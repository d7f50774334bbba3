"""Every figure, made only from result files (CSV/JSON), never from model runs.

    python -m ds_study.figures     # every figure in FIGURES whose result files exist, into paper_figures/

A figure is a function ``(result files, out stem, formats) -> written paths`` registered in
``FIGURES`` by ``@figure``; ``paper_figures/FIGURE_SOURCES.md`` is generated from the registry and
the commands the result files record."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, out: Path, formats=("png",)) -> list[Path]:
    paths = []
    for fmt in formats:
        p = Path(out).with_suffix(f".{fmt}")
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths


FIGURES: list[tuple] = []  # name, paper figure, glob under the results root, plotter, what it shows


def figure(name: str, paper: str, pattern: str, what: str):
    """Register a plotter ``(result files, out stem, formats) -> written paths`` as figure ``name``
    (the ``paper`` figure it stands for), drawn from the files matching ``pattern`` under the results
    root: adding a figure is this decorator on one function."""

    def register(fn):
        FIGURES.append((name, paper, pattern, fn, what))
        return fn

    return register


def plot_deviation(csv_path: Path, out: Path, title: str = "", formats=("png",)) -> list[Path]:
    """Per-layer relative L2 deviation of K/V/E (p25-p75 band) and attention-output cosine."""
    import pandas as pd

    df = pd.read_csv(csv_path)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for col, color in (("k_dev", "C0"), ("v_dev", "C1"), ("e_dev", "C2")):
        ax.plot(df.layer, df[col], marker="o", color=color, label=col.replace("_dev", ""))
        ax.fill_between(df.layer, df[f"{col}_p25"], df[f"{col}_p75"], color=color, alpha=0.2)
    ax.set_ylabel("relative L2, sender vs receiver")
    ax.legend()
    ax.set_title(title or "Per-layer deviation")
    ax2.plot(df.layer, df.attn_cos, marker="s", color="C3")
    ax2.fill_between(df.layer, df.attn_cos_p25, df.attn_cos_p75, color="C3", alpha=0.2)
    ax2.set_ylabel("attention-output cosine\n(own KV vs sender KV)")
    ax2.set_xlabel("layer")
    return save(fig, out, formats)


# --------------------------------------------------------------------------------------------
# Paper figures from results/study and results/search (python -m ds_study.figures)


def _json(p: Path) -> dict:
    import json

    return json.loads(Path(p).read_text())


def _pair_title(meta: dict) -> str:
    return f"{meta['pair']}: {Path(str(meta.get('sender', '?'))).name} \u2192 {Path(str(meta.get('receiver', '?'))).name}"


def _grid(n: int, width: float = 4.2, height: float = 3.2):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def csv_figure(name: str, paper: str, pattern: str, what: str, meta: str, width: float = 5,
               layers_in_title: bool = False):
    """Register ``draw(axis, meta, table)`` as figure ``name``: one panel per CSV result file
    matching ``pattern``, ``meta`` the JSON result beside it, titled by pair and dataset (and the
    result's ``layers`` where ``layers_in_title``)."""

    def register(draw):
        def plot(files: list[Path], out: Path, formats) -> list[Path]:
            import pandas as pd

            fig, axes = _grid(len(files), width=width)
            for ax, f in zip(axes, files):
                m = _json(f.with_name(meta))
                draw(ax, m, pd.read_csv(f))
                _title(ax, m, f": layers {m['layers']}" if layers_in_title else "")
            return save(fig, out, formats)

        plot.__name__, plot.__doc__ = draw.__name__, draw.__doc__
        figure(name, paper, pattern, what)(plot)
        return draw

    return register


def json_figure(name: str, paper: str, pattern: str, what: str, figsize: tuple[float, float]):
    """Register ``draw(axis, result)`` as figure ``name``: one axis drawn from the JSON result file
    matching ``pattern``."""

    def register(draw):
        def plot(files: list[Path], out: Path, formats) -> list[Path]:
            fig, ax = plt.subplots(figsize=figsize)
            draw(ax, _json(files[0]))
            return save(fig, out, formats)

        plot.__name__, plot.__doc__ = draw.__name__, draw.__doc__
        figure(name, paper, pattern, what)(plot)
        return draw

    return register


def _title(ax, meta: dict, extra: str = "") -> None:
    ax.set_title(f"{_pair_title(meta)} ({meta['dataset']}){extra}", fontsize=9)


@figure("fig6_quality", "Fig. 6", "study/*/*/quality.json",
        "receiver alone, receiver on the sender's whole cache, sender alone")
def fig_quality(files: list[Path], out: Path, formats) -> list[Path]:
    """Fig. 6: receiver alone / receiver with the sender's whole cache / sender alone, per pair x dataset."""
    by_pair: dict[str, list[dict]] = {}
    for f in files:
        m = _json(f)
        by_pair.setdefault(m["pair"], []).append(m)
    fig, axes = _grid(len(by_pair))
    names = {"full_prefill": "receiver (full prefill)", "full_reuse": "receiver, full reuse", "sender": "sender"}
    for ax, (pair, ms) in zip(axes, sorted(by_pair.items())):
        ms.sort(key=lambda m: m["dataset"])
        for j, plan in enumerate(names):
            xs = [i + (j - 1) * 0.27 for i in range(len(ms))]
            ax.bar(xs, [m["scores"].get(plan, float("nan")) for m in ms], 0.27, label=names[plan], color=f"C{j}")
        ax.set_xticks(range(len(ms)), [f"{m['dataset']}\n({m['metric_label']})" for m in ms])
        ax.set_title(_pair_title(ms[0]), fontsize=9)
        ax.set_ylabel("quality")
    axes[0].legend(fontsize=7)
    return save(fig, out, formats)


@figure("fig7_sensitivity", "Fig. 7", "study/*/*/sensitivity.json",
        "single-layer KV reuse: quality per layer, critical layers in red")
def fig_sensitivity(files: list[Path], out: Path, formats) -> list[Path]:
    """Fig. 7: quality when the receiver reuses the sender's KV at one layer only; critical layers in red."""
    fig, axes = _grid(len(files))
    for ax, f in zip(axes, files):
        m = _json(f)
        s, crit = m["layer_scores"], set(m["critical_layers"])
        ax.bar(range(len(s)), s, color=["C3" if i in crit else "C7" for i in range(len(s))])
        ax.axhline(m["full_prefill"], ls="--", color="k", lw=1, label="receiver (full prefill)")
        from ds_study.frontier import threshold

        ax.axhline(threshold(m["full_prefill"], m["critical_threshold"], m["critical_mode"]), ls=":", color="C3",
                   lw=1, label=f"critical: > {m['critical_threshold']:g} {m['critical_mode']} drop")
        _title(ax, m)
        ax.set_xlabel("layer whose KV is reused")
        ax.set_ylabel(m["metric_label"])
    axes[0].legend(fontsize=7)
    return save(fig, out, formats)


@csv_figure("fig8_spread", "Fig. 8", "study/*/*/sensitivity_per_example.csv",
            "per-input quality change of each single-layer reuse", meta="sensitivity.json")
def fig_spread(ax, m: dict, df) -> None:
    """Fig. 8: per-input quality change of each single-layer reuse, violins with 25th/75th percentiles."""
    layers = sorted(df.layer.unique())
    data = [df[df.layer == i].change.values for i in layers]
    parts = ax.violinplot(data, positions=layers, showextrema=False, widths=0.8)
    for body, i in zip(parts["bodies"], layers):
        body.set_facecolor("C3" if i in m["critical_layers"] else "C0")
    q = df.groupby("layer").change.quantile([0.25, 0.5, 0.75]).unstack()
    ax.vlines(layers, q[0.25], q[0.75], color="k", lw=3)
    ax.scatter(layers, q[0.5], color="w", s=8, zorder=3)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("layer whose KV is reused")
    ax.set_ylabel(f"per-input {m['metric_label']} change (points)")


@csv_figure("fig10_propagation", "Fig. 10", "study/*/*/propagation.csv",
            "output error: several transition points vs one contiguous group", meta="propagation.json",
            layers_in_title=True)
def fig_propagation(ax, m: dict, df) -> None:
    """Fig. 10: output error and quality, the chosen layers as separate groups, merged step by step, and
    each multi-group plan's contiguous twin (one group of as many layers)."""
    x = range(len(df))
    ax.bar(x, df.out_err_mean, color="C1", yerr=[df.out_err_mean - df.out_err_p25, df.out_err_p75 - df.out_err_mean],
           capsize=3, label="output error (mean, p25-p75)")
    ax.set_xticks(list(x), [f"{g}\nk={k}, {t} trans." for g, k, t in zip(df.groups, df.k, df.transitions)],
                  fontsize=6, rotation=30, ha="right")  # the contiguous twins (one group, as many layers) follow the chain
    ax.set_ylabel("relative L2 of final hidden states")
    ax2 = ax.twinx()
    ax2.plot(list(x), df.score, "o-", color="C0", label=m["metric_label"])
    ax2.axhline(m["full_prefill"], ls="--", color="C0", lw=1)
    ax2.set_ylabel(m["metric_label"], color="C0")
    ax.legend(fontsize=7, loc="upper center")


@figure("fig11_profile", "Fig. 11", "search/*/*/search.json",
        "profiled groups, Pareto frontier, greedy walk, selected plans")
def fig_profile(files: list[Path], out: Path, formats) -> list[Path]:
    """Fig. 11: every profiled group (quality vs recomputed layers), the frontier, the greedy walk and
    the selected plans."""
    import pandas as pd

    fig, axes = _grid(len(files), width=4.6)
    for ax, f in zip(axes, files):
        m = _json(f)
        g = min(int(k) for k in m["exhaustive"])
        pts = pd.read_csv(f.with_name(f"points_g{g}.csv"))
        ax.scatter(pts.k, pts.score, s=12, color="C7", label=f"groups (g={g})")
        front = pd.DataFrame(m["exhaustive"][str(g)]["frontier"]).dropna(subset=["score"])
        ax.plot(front.k, front.score, "-", color="C0", label="frontier")
        if m.get("greedy") and f.with_name("greedy.csv").exists():
            gr = pd.read_csv(f.with_name("greedy.csv"))
            ax.scatter(gr.k, gr.score, marker="x", color="C1", s=30,
                       label=f"greedy ({m['greedy']['evaluations']} evals)")
        ax.axhline(m["base"], ls="--", color="k", lw=1, label="full prefill")
        for s, c in zip(m["exhaustive"][str(g)]["selected"], ("C3", "C2", "C4")):
            if s["plan"]:
                ax.scatter([s["k"]], [s["score"]], s=90, facecolors="none", edgecolors=c,
                           label=f"selected, delta {s['delta']:g}")
        ax.set_xlabel("recomputed layers")
        ax.set_ylabel(m["metric_label"])
        _title(ax, m)
    axes[0].legend(fontsize=6)
    return save(fig, out, formats)


@figure("fig17_transfer", "Fig. 17", "study/*/transfer.csv",
        "frontier profiled on one dataset, applied to the others")
def fig_transfer(files: list[Path], out: Path, formats) -> list[Path]:
    """Fig. 17: quality on each target dataset vs reused layers, frontier profiled on each source."""
    import pandas as pd

    panels = []
    for f in files:
        df = pd.read_csv(f)
        for t in sorted(df.target.unique()):
            panels.append((_json(f.with_name("transfer.json")), t, df[df.target == t]))
    fig, axes = _grid(len(panels))
    for ax, (m, t, df) in zip(axes, panels):
        for j, s in enumerate(sorted(df.source.unique())):
            d = df[df.source == s].sort_values("n_reused")
            ax.plot(d.n_reused, d.score, "o-" if s == t else "s--", color=f"C{j}", ms=4,
                    label=f"profiled on {s}" + (" (own)" if s == t else ""))
        ax.set_xlabel("reused layers")
        ax.set_ylabel(df.metric.iloc[0])
        ax.set_title(f"{m['pair']}: tested on {t}", fontsize=9)
        ax.legend(fontsize=7)
    return save(fig, out, formats)


# --------------------------------------------------------------------------------------------
# Engine figures from results/engine (written by scripts/bench_ttft.py)


COLORS = {"pipelined": "tab:blue", "send_reused": "tab:orange", "send_all": "tab:green",
          "full_prefill": "tab:red", "full_reuse": "tab:purple"}
LABELS = {"pipelined": "(c) pipelined (ours)", "send_reused": "(b) send reused layers",
          "send_all": "(a) send all layers", "full_prefill": "full prefill (re-compute)", "full_reuse": "full reuse"}


def _draw_timeline(ax, results: list[dict], scale: float, unit: str, title: str) -> None:
    colors = {"A": "tab:blue", "B": "tab:orange"}
    for r in results:
        c = colors.get(r["request"], "tab:gray")
        for s in r["spans"]:
            x, w = s["start"] * scale, (s["end"] - s["start"]) * scale
            if s["op"] == "load":
                ax.barh(1, w, left=x, color=c, edgecolor="k", lw=0.5, hatch="//" if s.get("kind") == "e" else None)
                if w > 0.6 * scale * (1 if unit == "units" else 1e-3):
                    ax.text(x + w / 2, 1, ("E" if s.get("kind") == "e" else "") + str(s["layer"] + 1),
                            ha="center", va="center", fontsize=6)
            elif s["op"] in ("recompute", "final"):
                ax.barh(0, w, left=x, color=c, edgecolor="k", lw=0.5, alpha=1 if s["op"] == "recompute" else 0.45)
            elif s["op"] == "wait" and s.get("layer") is not None:
                ax.barh(-0.45, w, left=x, height=0.2, color="0.6")
        ax.axvline((r["arrival"] + r["ttft"]) * scale, c=c, ls="--", lw=1)
    ax.set_yticks([1, 0, -0.45], ["link", "compute", "wait"], fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(unit, fontsize=7)
    ax.tick_params(labelsize=7)


@figure("fig13_timeline", "Fig. 13", "engine/fig13_timeline.json",
        "two receivers under strategies (a), (b), (c): unit-cost schedule and measured timeline")
def fig_timeline(files: list[Path], out: Path, formats) -> list[Path]:
    """Fig. 13: two receivers under strategies (a), (b), (c), unit-cost simulation beside the measured run."""
    d = _json(files[0])
    cols = 2 if "measured" in d else 1
    fig, axes = plt.subplots(3, cols, figsize=(6 * cols, 6), squeeze=False)
    for row, strategy in enumerate(("send_all", "send_reused", "pipelined")):
        sim = d["simulated_unit_cost"][strategy]
        _draw_timeline(axes[row][0], sim["results"], 1.0, "units",
                       f"{LABELS[strategy]}: simulated, sum TTFT = {sim['sum_ttft']:g}")
        if cols == 2:
            m = d["measured"]["strategies"][strategy]
            _draw_timeline(axes[row][1], m["results"], 1e3, "ms",
                           f"{LABELS[strategy]}: measured, sum TTFT = {m['sum_ttft_ms']:.1f} ms")
    fig.suptitle("Fig. 13: A recomputes its last layers, B its first three; B arrives 2 units later\n"
                 "(blue A, orange B; hatched = E; solid = recompute, light = final pass; dashed = first token)",
                 fontsize=8)
    fig.tight_layout()
    return save(fig, out, formats)


@json_figure("fig14_ttft_quality", "Fig. 14", "engine/ttft_quality.json",
             "TTFT vs quality per strategy and plan on CPU, with the bound max(compute, load)", figsize=(7, 4.5))
def fig_ttft_quality(ax, d: dict) -> None:
    """Fig. 14: TTFT vs quality per strategy and plan, with the bound max(compute, load)."""
    for strategy in ("send_all", "send_reused", "pipelined", "full_reuse", "full_prefill"):
        pts = [s for s in d["summary"] if s["strategy"] == strategy]
        if not pts:
            continue
        marker = {"full_prefill": "X", "full_reuse": "^"}.get(strategy, "o")
        ax.scatter([s["ttft_ms"] for s in pts], [s["quality"] for s in pts], c=COLORS[strategy], marker=marker,
                   s=60 if strategy in ("pipelined", "full_prefill", "full_reuse") else 25,
                   alpha=1 if strategy in ("pipelined", "full_prefill", "full_reuse") else 0.5,
                   label=LABELS[strategy], zorder=3)
        if strategy == "pipelined":
            ax.scatter([s["bound_ms"] for s in pts], [s["quality"] for s in pts], facecolors="none",
                       edgecolors="tab:blue", s=60, label="lower bound max(compute, load)", zorder=3)
            for s in pts:
                ax.plot([s["bound_ms"], s["ttft_ms"]], [s["quality"]] * 2, ":", c="tab:blue", lw=1)
                ax.annotate(s["plan"], (s["ttft_ms"], s["quality"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.set_xlabel("TTFT (ms, median)")
    ax.set_ylabel(f"{d['task']} {d['metric']} (n={d['n_examples']})")
    ax.set_title(f"TTFT vs quality, {d['pair']}\nlink {d['link']['gbps']} Gbit/s, CPU", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)


@json_figure("fig20_bandwidth", "Fig. 20", "engine/ttft_bandwidth.json",
             "TTFT vs link bandwidth for (a), (b), (c) and full prefill on CPU", figsize=(6.5, 4))
def fig_bandwidth(ax, d: dict) -> None:
    """Fig. 20: TTFT vs link bandwidth for (a), (b), (c) and full prefill."""
    from matplotlib.ticker import ScalarFormatter

    for strategy in ("send_all", "send_reused", "pipelined", "full_prefill"):
        pts = sorted((s for s in d["summary"] if s["strategy"] == strategy), key=lambda s: s["gbps"])
        ax.plot([s["gbps"] for s in pts], [s["ttft_ms"] for s in pts], "o-", c=COLORS[strategy], label=LABELS[strategy])
        if strategy == "pipelined":
            ax.plot([s["gbps"] for s in pts], [s["bound_ms"] for s in pts], "--", c="tab:blue", alpha=0.6,
                    label="lower bound max(compute, load)")
    ax.axvline(d["crossover_gbps"], c="gray", ls=":", label=f"load = full prefill ({d['crossover_gbps']:.2g} Gbit/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("TTFT (ms, median)")
    ax.set_title(f"TTFT vs bandwidth, plan {d['plan']}, {d['pair']}, CPU", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


SERVE_COLORS = {"full_prefill": "tab:red", "full_reuse": "tab:purple", "cacheblend": "tab:green",
                "droidspeak": "tab:blue"}


@figure("fig15_cpu_serving", "Fig. 15", "serving/*/*/summary.json",
        "the real serving loop on CPU: receiver TTFT and goodput at the TTFT SLO against request rate, per strategy")
def fig_cpu_serving(files: list[Path], out: Path, formats) -> list[Path]:
    """Fig. 15 on CPU: receiver TTFT (mean, p90 dashed) and goodput against the rate, per strategy."""
    return _two_panels(files, out, formats, _draw_cpu_serving, lambda f: f"{f.parent.parent.name}_{f.parent.name}")


def _two_panels(files: list[Path], out: Path, formats, draw, stem) -> list[Path]:
    """One figure of two side-by-side panels per result file, ``draw(left, right, result, fig)``, saved
    as ``<out>_<stem(file)>``."""
    paths = []
    for f in files:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        draw(a, b, _json(f), fig)
        paths += save(fig, out.with_name(f"{out.name}_{stem(f)}"), formats)
    return paths


def _draw_cpu_serving(a, b, d: dict, fig) -> None:
    for strategy in dict.fromkeys(r["strategy"] for r in d["runs"]):
        runs = sorted((r for r in d["runs"] if r["strategy"] == strategy), key=lambda r: r["rate"])
        rates = [r["rate"] for r in runs]
        c = SERVE_COLORS.get(strategy)
        label = strategy + (f" ({d['settings']['plan']})" if strategy == "droidspeak" else "")
        a.plot(rates, [r["receiver"]["ttft_ms"]["mean"] / 1e3 for r in runs], "o-", c=c, label=label)
        a.plot(rates, [r["receiver"]["ttft_ms"]["p90"] / 1e3 for r in runs], "--", c=c, alpha=0.5)
        b.plot(rates, [r["receiver"]["goodput"] for r in runs], "o-", c=c, label=label)
    a.axhline(d["settings"]["slo_ttft_s"], c="gray", ls=":", label="TTFT SLO")
    a.set_xlabel("contexts per second (each: sender + receiver request)")
    a.set_ylabel("receiver TTFT (s): mean, p90 dashed")
    b.set_xlabel("contexts per second")
    b.set_ylabel("receiver goodput (req/s within the SLO)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(f"Serving {d['pair']} on CPU, {d['settings']['n_contexts']} contexts per run, "
                 f"{d['settings']['max_new_tokens']} output tokens, link {d['settings']['gbps']} Gbit/s", fontsize=9)


@json_figure("fig15_h200_sim", "Fig. 15", "serving/fig15_h200_llama3_8b.json",
             "simulated serving at Llama-3-8B scale with measured H200 costs: TTFT against request rate, "
             "and throughput at the TTFT SLO", figsize=(6.5, 4))
def fig_h200_serving(ax, d: dict) -> None:
    """Fig. 15 at Llama-3-8B scale (simulated on measured H200 costs): mean TTFT against the rate."""
    for strategy in dict.fromkeys(r["strategy"] for r in d["curve"]):
        pts = [r for r in d["curve"] if r["strategy"] == strategy]
        ratio = d["throughput_ratio_vs_full_prefill"][strategy]
        ax.plot([r["rate"] for r in pts], [r["ttft_mean_s"] for r in pts], "o-", ms=3, c=SERVE_COLORS.get(strategy),
                label=f"{strategy}: {d['capacity_at_slo'][strategy]:.0f} req/s at the SLO ({ratio:.1f}x)")
    ax.axhline(d["slo_ttft_s"], c="gray", ls=":", label=f"TTFT SLO {d['slo_ttft_s']:.2f} s")
    ax.set_yscale("log")
    ax.set_xlabel("receiver requests per second")
    ax.set_ylabel("mean TTFT (s)")
    ax.set_title(f"Simulated, {d['receiver_units']} receiver replicas, {d['tokens']} tokens, H200 costs", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


@figure("fig21_adaptation", "Fig. 21", "serving/*/fig21_adaptation.json",
        "runtime adaptation on calibrated CPU costs: SLO violations against quality for fixed plans and the "
        "policies, and against link bandwidth for load-only and bandwidth-aware adaptation")
def fig_adaptation(files: list[Path], out: Path, formats) -> list[Path]:
    """Fig. 21: SLO violation rate against mean KL (fixed plans, adaptation), and against bandwidth."""
    return _two_panels(files, out, formats, _draw_adaptation, lambda f: f.parent.name)


def _draw_adaptation(a, b, d: dict, fig) -> None:
    a.plot([p["mean_kl"] for p in d["fixed"]], [p["slo_violation"] for p in d["fixed"]], "o-", c="gray",
           label="fixed plans (k = 0 .. all layers)")
    for p, m in zip(d["adaptive"], ("*", "P")):
        a.scatter([p["mean_kl"]], [p["slo_violation"]], marker=m, s=120, zorder=3, label=p["policy"])
    a.axvline(d["kl_target"], c="gray", ls=":", label="KL target")
    a.set_xlabel("mean KL from the receiver's full prefill (lower is better)")
    a.set_ylabel("SLO violation rate")
    for policy, c in (("adaptive (load)", "tab:orange"), ("adaptive (load + bandwidth)", "tab:blue")):
        pts = sorted((p for p in d["bandwidth_sweep"] if p["policy"] == policy), key=lambda p: p["gbps"])
        b.plot([p["gbps"] for p in pts], [p["slo_violation"] for p in pts], "o-", c=c, label=policy)
    b.set_xscale("log")
    b.set_xlabel("link bandwidth (Gbit/s)")
    b.set_ylabel("SLO violation rate")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Adaptation, {d['pair']} costs (simulated), {d['rate']:.3f} contexts/s, burstiness "
                 f"{d['burstiness']}, SLO {d['slo_ttft_s']} s", fontsize=9)


def _commands(files: list[Path]) -> list[str]:
    import json

    cmds = []
    for f in files:
        meta = f if f.suffix == ".json" else next((p for p in (f.with_name(f.stem.split("_per_example")[0] + ".json"),
                                                                f.with_suffix(".json")) if p.exists()), None)
        if meta and meta.exists():
            m = json.loads(meta.read_text())
            cmd = m.get("command") or (m.get("environment") or {}).get("command")  # engine results: in environment
            if cmd and cmd not in cmds:
                cmds.append(cmd)
    return cmds


class FigureError(RuntimeError):
    """Some figures could not be drawn from their result files; the others were made."""


def make_all(results: Path = Path("results"), out: Path = Path("paper_figures"),
             formats=("png", "pdf")) -> list[Path]:
    """Every figure whose result files exist, plus FIGURE_SOURCES.md mapping figures to files and commands."""
    results, out = Path(results), Path(out)
    failed: list[str] = []
    made, lines = [], ["# Figure sources", "",
                       "Regenerate every figure from the result files alone (no model runs):", "",
                       "    python -m ds_study.figures" + ("" if str(results) == "results" else f" --results {results}")
                       + ("" if str(out) == "paper_figures" else f" --out {out}"), ""]
    for name, paper, pattern, fn, what in FIGURES:
        files = sorted(results.glob(pattern))
        if pattern.startswith("search/"):
            files = [f for f in files if "exhaustive" in _json(f)]
        if not files:
            lines += [f"## {name} ({paper} analogue): not made", "", f"No `{results}/{pattern}` yet.", ""]
            continue
        try:
            paths = fn(files, out / name, formats)
        except Exception as e:  # noqa: BLE001 - one unreadable result set must not cost the other figures
            failed.append(f"{name}: {type(e).__name__}: {e}")
            lines += [f"## {name} ({paper} analogue): FAILED", "", f"`{type(e).__name__}: {e}` while reading:", ""]
            lines += [f"- `{f}`" for f in files] + [""]
            continue
        made += paths
        lines += [f"## {name} ({paper} analogue)", "", what + ".", "",
                  "Files: " + ", ".join(f"`{p.name}`" for p in paths), "", "Result files:", ""]
        lines += [f"- `{f.relative_to(results.parent) if results.is_absolute() is False else f}`" for f in files]
        lines += ["", "Made by:", ""] + [f"    {c}" for c in _commands(files)] + [""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "FIGURE_SOURCES.md").write_text("\n".join(lines))
    if failed:
        raise FigureError("some figures could not be made (the others were, see FIGURE_SOURCES.md):\n  "
                          + "\n  ".join(failed))
    return made


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Regenerate every figure from result files (no model runs).")
    ap.add_argument("--results", default="results", help="results root holding study/, search/ and engine/")
    ap.add_argument("--out", default="paper_figures")
    ap.add_argument("--formats", default="png,pdf")
    a = ap.parse_args(argv)
    try:
        made = make_all(Path(a.results), Path(a.out), tuple(a.formats.split(",")))
    except FigureError as e:
        raise SystemExit(str(e)) from None
    for p in made:
        print(p)
    print(f"{len(made)} files and {Path(a.out) / 'FIGURE_SOURCES.md'}")


if __name__ == "__main__":
    main()
