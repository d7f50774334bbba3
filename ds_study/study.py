"""The study of DroidSpeak §3 on one pair: why reuse needs recomputation, and which layers.

    python -m ds_study.study                            # study=all on the default embedded pair
    python -m ds_study.study study=sensitivity model_pair=smol_sum
    python -m ds_study.study model_pair=custom model_pair.receiver=DIR model_pair.sender=DIR \\
        model_pair.task=hotpotqa 'study.quality.datasets=[hotpotqa,2wikimqa]' 'study.transfer.datasets=[...]'

Jobs (ds_study/conf/study/*.yaml), each writing its files into the run's own directory,
``<run>/study/<pair>/...`` (``python -m ds_study.figures --results <run>`` plots them). Only with
``study.publish=true`` (the explicit "regenerate the committed results" step) are they also copied
to the stable ``results/study/<pair>/`` (or ``study_root``) that ``python -m ds_study.figures`` reads:

- quality (Fig. 6): receiver alone, receiver on the sender's whole cache, sender alone, per dataset
  -> ``<dataset>/quality.json``.
- sensitivity (Fig. 7, 8): the receiver reads the sender's KV at one layer only; quality per
  layer, critical layers, and the per-input spread of each layer's quality change
  -> ``<dataset>/sensitivity.{csv,json}``, ``<dataset>/sensitivity_per_example.csv``.
- propagation (Fig. 10): the same critical layers recomputed as several groups (several
  transition points) and merged step by step into one contiguous group; output error (relative
  L2 of the suffix's final hidden states vs full prefill) and quality -> ``<dataset>/propagation*.csv``.
- transfer (Fig. 17): the frontier profiled on each dataset, applied to every other one
  -> ``transfer.{csv,json}``.

All cells go through the pair's resumable cell files, so the jobs share work with each other and
with ``ds_study.profile``, and a rerun after an interruption skips what is done.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from ds_study import frontier, metrics, runner, search
from ds_study.cli import hydra_main
from ds_study.pairs import interval
from ds_study.plans import layer_runs, parse_plan

JOBS = ("quality", "sensitivity", "propagation", "transfer")


class Study:
    """One loaded pair plus, per dataset, its examples and evaluator."""

    def __init__(self, cfg: DictConfig, pair=None, root: Path | None = None):
        self.cfg = cfg
        self.pair = pair if pair is not None else runner.load_pair_from(cfg)
        self.L = self.pair.n_layers
        self.root = None if root is None else Path(root)  # where the jobs write: <run>/study/<pair> (main sets it)
        self._ctx: dict[str, tuple] = {}

    def datasets(self, names) -> list[str]:
        return list(names) if names else [self.cfg.model_pair.task]

    def context(self, dataset: str):
        """(task, examples, evaluator) of one dataset, built once."""
        if dataset not in self._ctx:
            cfg = self.cfg.copy()
            OmegaConf.set_struct(cfg, False)
            cfg.dataset = dataset
            cfg.dataset_path = self.cfg.dataset_path if dataset == self.cfg.model_pair.task else None
            task = runner.validate(cfg)
            self._ctx[dataset] = (task, *runner.evaluator_for(cfg, self.pair, task))
        return self._ctx[dataset]

    def out(self, *parts) -> Path:
        if self.root is None:
            raise RuntimeError("Study.root is not set: main() points it at the run directory")
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def meta(self, task, examples) -> dict:
        return {"pair": self.cfg.model_pair.name, "receiver": self.pair.receiver_id["name"],
                "sender": self.pair.sender_id["name"], "dataset": task.name, "split": self.cfg.split,
                "n_examples": len(examples), "n_layers": self.L, "metric": task.metric,
                "metric_label": metrics.get_metric(task.metric).label,
                "metric_version": metrics.get_metric(task.metric).version, "models": self.pair.identities(),
                "command": command()}

    def base_rows(self, dataset: str) -> list[dict]:
        """The receiver's full-prefill cells on the dataset's examples."""
        task, examples, ev = self.context(dataset)
        return search.evaluate(ev, [parse_plan("full_prefill", self.L)], examples, "full prefill")["full_prefill"]

    def base(self, dataset: str) -> tuple[float, dict[str, float]]:
        """Receiver full-prefill quality and per-example scores."""
        rows = self.base_rows(dataset)
        return search.quality(rows), {r["id"]: r["score"] for r in rows}

    def deviation(self, dataset: str) -> pd.DataFrame:
        """Per-layer K/V/E deviation and attention-output cosine between the pair's caches on the
        dataset's examples (two forward passes per example, no decoding) -> ``<dataset>/deviation.csv``."""
        from ds_study import deviation

        path = self.out(dataset, "deviation.csv")
        if path.exists():
            return pd.read_csv(path)
        task, examples, ev = self.context(dataset)
        per_ex = []
        for ex in examples:
            s_cache, r_cache = ev.caches(ex, need_receiver=True)
            per_ex += [{"id": ex.id, **r} for r in deviation.layer_deviation(self.pair.receiver, r_cache, s_cache)]
        df = deviation.summarize(per_ex)
        df.to_csv(path, index=False)
        return df

    def label_free(self, dataset: str, by_target: dict) -> dict:
        """Critical layers without quality labels: Spearman correlation between each deviation-based
        per-layer prior (``search.PRIORS``, from the deviation profile alone) and the measured
        single-layer sensitivity (the drop from full prefill) under every quality target."""
        self.deviation(dataset)  # writes deviation.csv if this run has not yet
        dev_csv = self.out(dataset, "deviation.csv")
        out = {}
        for prior in search.PRIORS:
            pred = pd.Series(search.layer_prior(dev_csv, prior))
            out[prior] = {}
            for t, r in by_target.items():
                drop = pd.Series([r["full_prefill"] - x for x in r["layer_scores"]])
                rho = pred.rank().corr(drop.rank())
                out[prior][t] = None if pd.isna(rho) else round(float(rho), 3)
        return out

    # ----------------------------------------------------------------------------------------

    def quality(self) -> list[dict]:
        """Fig. 6: the three baselines on every dataset."""
        qc, out = self.cfg.study.quality, []
        for d in self.datasets(qc.datasets):
            task, examples, ev = self.context(d)
            plans = runner.plans_of(qc.plans, self.L)
            rows = search.evaluate(ev, plans, examples, f"quality {d}")
            scores = {p.name: search.quality(rows[p.name]) for p in plans}
            res = {**self.meta(task, examples), "scores": scores}
            runner.write_json(self.out(d, "quality.json"), res)
            out.append(res)
            print(f"  quality {d:<8} " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        return out

    def sensitivity(self, dataset: str, verbose: bool = True, write: bool = True) -> dict:
        """Fig. 7 + 8: quality when only layer i reads the sender's KV; critical layers; per-input spread.
        ``write=False``: only the result, for a job that builds on it (its files stay the sensitivity
        job's own, with that job's command)."""
        sc = self.cfg.study.sensitivity
        task, examples, ev = self.context(dataset)
        base, base_by_id = self.base(dataset)
        plans = frontier.sensitivity_plans(self.L)
        rows = search.evaluate(ev, plans, examples, f"sensitivity {dataset}")
        layer_scores = [search.quality(rows[p.name]) for p in plans]
        crit = frontier.critical_layers(layer_scores, base, sc.critical_threshold, sc.critical_mode)
        per_ex = pd.DataFrame([{"layer": i, "id": r["id"], "score": 100 * r["score"],
                                "full_prefill": 100 * base_by_id[r["id"]],
                                "change": 100 * (r["score"] - base_by_id[r["id"]])}
                               for i, p in enumerate(plans) for r in rows[p.name]])
        if write:
            per_ex.to_csv(self.out(dataset, "sensitivity_per_example.csv"), index=False)
        g = per_ex.groupby("layer")["change"]
        table = pd.DataFrame({"layer": range(self.L), "score": layer_scores,
                              "rel_drop": [round(1 - s / base, 4) if base else 0.0 for s in layer_scores],
                              "critical": [i in crit for i in range(self.L)]})
        table["change_mean"] = g.mean().values
        for q in sc.percentiles:
            table[f"change_p{q}"] = g.quantile(q / 100).values
        table["frac_inputs_changed"] = g.apply(lambda c: float((c != 0).mean())).values
        if write:
            table.to_csv(self.out(dataset, "sensitivity.csv"), index=False)
        res = {**self.meta(task, examples), "full_prefill": base, "layer_scores": layer_scores,
               "critical_layers": crit, "critical_threshold": sc.critical_threshold,
               "critical_mode": sc.critical_mode}
        # the same cells under the continuous targets, and the ranking predicted from deviation alone
        by_target = {}
        for t in metrics.TARGETS:
            fp = search.quality(self.base_rows(dataset), t)
            scores = [search.quality(rows[p.name], t) for p in plans]
            by_target[t] = {"full_prefill": fp, "layer_scores": scores,
                            "critical_layers": frontier.critical_layers(scores, fp, sc.critical_threshold,
                                                                      sc.critical_mode)}
        res["by_target"] = by_target
        if len(examples) >= 4:  # Fig. 8's claim as a number: can one half of the inputs rank the layers as the other?
            res["stability"] = {t: frontier.ranking_reliability(
                {p.name: [metrics.example_value(r, t) for r in rows[p.name]] for p in plans}) for t in metrics.TARGETS}
        res["prediction"] = self.label_free(dataset, by_target)
        if write:
            runner.write_json(self.out(dataset, "sensitivity.json"), res)
        if verbose:
            label = res["metric_label"]
            print(f"  sensitivity {dataset}: full prefill {base:.2f} {label}; per layer "
                  + " ".join(f"{i}:{s:.1f}" for i, s in enumerate(layer_scores)) + f"; critical {crit}")
            for t, r in by_target.items():
                if t != "task":
                    print(f"    under {t}: critical {r['critical_layers']}")
            print("    label-free prediction (Spearman of deviation prior vs measured drop): " + "; ".join(
                f"{prior}: " + ", ".join(f"{t} {v}" for t, v in r.items()) for prior, r in res["prediction"].items()))
        return res

    def propagation(self, dataset: str) -> pd.DataFrame:
        """Fig. 10: the same critical layers as separate groups vs merged into one contiguous group."""
        pc = self.cfg.study.propagation
        task, examples, ev = self.context(dataset)
        sens = self.sensitivity(dataset, verbose=False, write=False)
        target = str(pc.get("target") or "task")
        by = sens.get("by_target", {}).get(target) or {"layer_scores": sens["layer_scores"],
                                                        "critical_layers": sens["critical_layers"]}
        layers = critical_groups_layers(by["layer_scores"], by["critical_layers"], pc.top_k)
        chain = merge_chain(layer_runs(layers))
        # each multi-group step beside one contiguous group of as many layers, from the first chosen layer:
        # transitions against contiguity at an equal recompute count
        equal = {gr: ((min(gr[0][0], self.L - k), min(gr[0][0], self.L - k) + k - 1),)
                 for gr in chain if len(gr) > 1 for k in [sum(b - a + 1 for a, b in gr)]}
        groups = [()] + chain + [g for g in dict.fromkeys(equal.values()) if g not in chain]
        plans = [frontier.plan_of(gr, self.L) for gr in groups]
        rows = search.evaluate(ev, plans, examples, f"propagation {dataset}", out_err=True)
        per_ex, summary = [], []
        for p, gr in zip(plans, groups):
            pt = frontier.Point(p.name, tuple(gr), 0.0)
            errs = pd.Series([r["out_err"] for r in rows[p.name]])
            twin = frontier.plan_of(equal[gr], self.L).name if gr in equal else None
            summary.append({"plan": p.name, "groups": frontier.groups_str(gr), "n_groups": len(gr),
                            "transitions": pt.transitions, "k": pt.k, "score": search.quality(rows[p.name]),
                            "nll": search.quality(rows[p.name], "nll"), "kl": search.quality(rows[p.name], "kl"),
                            "out_err_mean": errs.mean(), "out_err_p25": errs.quantile(0.25),
                            "out_err_p50": errs.median(), "out_err_p75": errs.quantile(0.75),
                            "contiguous_twin": twin})
            if twin is not None:  # paired over examples: this plan's output error minus its twin's
                d = errs.to_numpy() - pd.Series([r["out_err"] for r in rows[twin]]).to_numpy()
                summary[-1]["out_err_minus_twin"] = interval(d)
            per_ex += [{"plan": p.name, "id": r["id"], "score": 100 * r["score"], "out_err": r["out_err"]}
                       for r in rows[p.name]]
        df = pd.DataFrame(summary)
        df.to_csv(self.out(dataset, "propagation.csv"), index=False)
        pd.DataFrame(per_ex).to_csv(self.out(dataset, "propagation_per_example.csv"), index=False)
        runner.write_json(self.out(dataset, "propagation.json"),
                          {**self.meta(task, examples), "target": target, "layers": layers,
                           "critical_layers": by["critical_layers"],
                           "full_prefill": sens["full_prefill"], "plans": summary})
        print(f"  propagation {dataset}: layers {layers}")
        for r in summary:
            print(f"    {r['plan']:<24} transitions {r['transitions']}  k {r['k']}  score {r['score']:6.2f}  "
                  f"exp(-KL) {r['kl']:6.2f}  output error {r['out_err_mean']:.4f}"
                  + (f"  vs {r['contiguous_twin']}: {r['out_err_minus_twin'][0]:+.4f} [{r['out_err_minus_twin'][1]:+.4f}, "
                     f"{r['out_err_minus_twin'][2]:+.4f}]" if r.get("contiguous_twin") else ""))
        return df

    def transfer(self) -> pd.DataFrame:
        """Fig. 17: frontier plans chosen on a source dataset, scored on each target dataset."""
        tc = self.cfg.study.transfer
        g = int(tc.granularity)
        names = self.datasets(tc.datasets)
        points, labels = {}, {}
        for d in names:
            task, examples, ev = self.context(d)
            points[d] = {p.groups: p for p in search.exhaustive(ev, examples, self.L, [g])[g]}
            labels[d] = metrics.get_metric(task.metric).label
        fronts = {d: frontier.frontier(list(points[d].values()), self.L) for d in names}
        rows = []
        for s in names:
            for t in names:
                for k, p in enumerate(fronts[s]):
                    if p is None:
                        continue
                    own = fronts[t][k]
                    on_t = points[t][p.groups].score
                    rows.append({"source": s, "target": t, "k": k, "n_reused": self.L - k, "plan": p.plan,
                                 "score": on_t, "target_frontier_plan": own.plan, "target_frontier": own.score,
                                 "gap": round(own.score - on_t, 2), "metric": labels[t]})
        df = pd.DataFrame(rows)
        df.to_csv(self.out("transfer.csv"), index=False)
        cross = df[df.source != df.target]
        stats = {f"{s}->{t}": {"max_gap": float(x.gap.max()), "mean_gap": round(float(x.gap.mean()), 2)}
                 for (s, t), x in cross.groupby(["source", "target"])}
        runner.write_json(self.out("transfer.json"),
                          {"pair": self.cfg.model_pair.name, "receiver": self.pair.receiver_id["name"],
                           "sender": self.pair.sender_id["name"], "datasets": names, "granularity": g,
                           "n_layers": self.L, "command": command(),
                           "split": self.cfg.split, "gaps": stats,
                           "max_gap": float(cross.gap.max()) if len(cross) else None,
                           "mean_gap": round(float(cross.gap.mean()), 2) if len(cross) else None})
        for key, v in stats.items():
            print(f"  transfer {key}: frontier gap max {v['max_gap']:.2f}, mean {v['mean_gap']:.2f} points")
        return df


def publish_root(cfg: DictConfig) -> Path:
    """Where ``study.publish=true`` writes the stable per-pair files the figures read: ``study_root``,
    or ``<results_root>/../study`` (the committed ``results/study``)."""
    return Path(cfg.study_root) if cfg.get("study_root") else Path(cfg.results_root).parent / "study"


def publish(cfg: DictConfig, src: Path) -> Path:
    """``study.publish=true``: copy the files this run wrote under ``src`` (``<run>/study/<pair>``) to
    ``<publish_root>/<pair>/``, replacing those files only (a run of some jobs keeps the others' files),
    with paths inside the checkout made relative (files meant to be committed)."""
    import json
    import shutil

    out = publish_root(cfg) / cfg.model_pair.name
    for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        dest = out / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".json":
            runner.write_json(dest, search.portable(json.loads(f.read_text()), runner.REPO_ROOT))
        else:
            shutil.copyfile(f, dest)
    print(f"published the study to {out}")
    return out


def command() -> str:
    """The command line that produced a result file (Hydra overrides included)."""
    import sys

    return " ".join(["python -m ds_study.study", *sys.argv[1:]])


# --------------------------------------------------------------------------------------------
# Groups for the propagation experiment


def critical_groups_layers(layer_scores, critical, top_k: int) -> list[int]:
    """The critical layers; if they form fewer than 2 separate groups, the most sensitive other layers
    (lowest single-layer-reuse quality) not adjacent to them are added until there are 2 groups, then
    any most sensitive layers until there are at least top_k."""
    layers = sorted(critical)
    ranked = sorted(range(len(layer_scores)), key=lambda i: (layer_scores[i], i))

    def keeps_apart(i):  # adds a separate group while there are < 2, never merges them back into one
        n, n_new = len(layer_runs(layers)), len(layer_runs(layers + [i]))
        return n_new > n if n < 2 else n_new >= 2

    while len(layer_runs(layers)) < 2 or len(layers) < min(top_k, len(layer_scores)):
        cand = [i for i in ranked if i not in layers and keeps_apart(i)]
        if not cand:
            break
        layers = sorted(layers + [cand[0]])
    return layers


def merge_chain(groups: list[tuple[int, int]]) -> list[tuple[tuple[int, int], ...]]:
    """From separate groups to one contiguous group, closing the smallest gap first (ties: earliest)."""
    chain = [tuple(groups)]
    cur = list(groups)
    while len(cur) > 1:
        j = min(range(len(cur) - 1), key=lambda j: (cur[j + 1][0] - cur[j][1], j))
        cur = cur[:j] + [(cur[j][0], cur[j + 1][1])] + cur[j + 2:]
        chain.append(tuple(cur))
    return chain


# --------------------------------------------------------------------------------------------


def check_config(cfg: DictConfig, n_layers: int) -> None:
    """Every ``study.*`` setting the chosen jobs read, checked before any weights load: a bad dataset
    name in the last job must not surface after the first jobs have run for hours."""
    from ds_study import data

    sc = cfg.study

    def fail(key: str, want: str, got) -> None:
        raise ValueError(f"study.{key} must be {want}, got {got!r}")

    if not isinstance(sc.get("publish", False), bool):
        fail("publish", "true or false", sc.publish)
    if cfg.get("study_root") and not sc.get("publish"):
        raise ValueError("study_root is where study.publish=true writes the stable result files; a study writes "
                         "its own files into its run directory. Add study.publish=true or drop study_root")

    for job in sc.jobs:
        names = sc[job].get("datasets") if job in sc else None
        unknown = [d for d in (names or []) if d not in data.TASKS]
        if unknown:
            fail(f"{job}.datasets", f"null or a list of {', '.join(sorted(data.TASKS))}", list(names))
    if "sensitivity" in sc.jobs or "propagation" in sc.jobs:
        sens = sc.sensitivity
        if sens.critical_mode not in ("relative", "absolute"):
            fail("sensitivity.critical_mode", "relative or absolute", sens.critical_mode)
        if not 0 <= float(sens.critical_threshold) < 1:
            fail("sensitivity.critical_threshold", "a fraction in [0, 1)", sens.critical_threshold)
        if any(not 0 <= float(q) <= 100 for q in sens.percentiles):
            fail("sensitivity.percentiles", "percentiles in [0, 100]", list(sens.percentiles))
    if "quality" in sc.jobs:
        runner.plans_of(sc.quality.plans, n_layers)  # raises on an unknown or out-of-range plan
    if "propagation" in sc.jobs and not 1 <= int(sc.propagation.top_k) <= n_layers:
        fail("propagation.top_k", f"an integer in [1, {n_layers}]", sc.propagation.top_k)
    if "propagation" in sc.jobs and str(sc.propagation.get("target") or "task") not in metrics.TARGETS:
        fail("propagation.target", " | ".join(metrics.TARGETS), sc.propagation.target)
    if "transfer" in sc.jobs and not 1 <= int(sc.transfer.granularity) <= n_layers:
        fail("transfer.granularity", f"an integer in [1, {n_layers}]", sc.transfer.granularity)


def main(cfg: DictConfig, pair=None) -> dict:
    jobs = list(cfg.study.jobs)
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        raise ValueError(f"unknown study job(s) {unknown}; available: {', '.join(JOBS)}")
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.dataset = None
    runner.validate(cfg)
    check_config(cfg, pair.n_layers if pair is not None else runner.receiver_layers(cfg))
    t0 = time.perf_counter()
    st = Study(cfg, pair)
    run = runner.start_run(cfg, "study", runner.task_of(cfg))
    st.root = run / "study" / cfg.model_pair.name  # never the committed results/study (study.publish=true copies there)
    runner.write_json(run / "env.json", runner.environment(cfg.device))
    print(f"study {'+'.join(jobs)} on {cfg.model_pair.name} (receiver {st.pair.receiver_id['name']} <- sender "
          f"{st.pair.sender_id['name']}), split {cfg.split} -> {st.root}")
    summary, timings = {"jobs": jobs, "pair": cfg.model_pair.name, "models": st.pair.identities()}, {}
    for job in jobs:
        t = time.perf_counter()
        if job == "quality":
            summary["quality"] = st.quality()
        elif job == "sensitivity":
            summary["sensitivity"] = [st.sensitivity(d) for d in st.datasets(cfg.study.sensitivity.datasets)]
        elif job == "propagation":
            summary["propagation"] = [st.propagation(d).to_dict("records")
                                      for d in st.datasets(cfg.study.propagation.datasets)]
        elif job == "transfer":
            summary["transfer"] = st.transfer().to_dict("records")
        timings[job] = round(time.perf_counter() - t, 1)
    evs = [c[2] for c in st._ctx.values()]
    summary.update(seconds=round(time.perf_counter() - t0, 1), job_seconds=timings,
                   cells_computed=sum(e.n_run for e in evs), cells_reused=sum(e.n_reused for e in evs),
                   cells_from_earlier_runs=sum(e.n_cached for e in evs))
    if cfg.study.get("publish"):
        summary["published"] = str(publish(cfg, st.root))
    runner.write_json(run / "summary.json", summary)
    print(f"study done in {summary['seconds']} s: {summary['cells_computed']} cells computed, "
          f"{summary['cells_reused']} reused; results {st.root}, run {run}")
    return summary


@hydra_main("study")  # user errors in one or two lines, bugs with their traceback (ds_study.cli)
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
