"""The pair table: receiver alone, receiver on the sender's whole KV, sender alone (paper Fig. 6).

    python -m ds_study.pairs --pairs smol_sum_code smol_sum smol_qa smol_code smol_qa_code --split test --out results/pairs_smol

For each pair, on its task's split, three baselines are evaluated in batches (``ds_study.batched``):
``full_prefill`` (the receiver alone), ``full_reuse`` (the receiver decoding from the sender's whole
context KV, no layer recomputed) and ``sender`` (the sender alone). Each example's row holds the task
score, the gold answer's teacher-forced NLL and the KL divergence from the receiver's full prefill;
rows go to the pair's cell file as soon as a batch finishes, so an interrupted run resumes.

The table reports every quality number with a bootstrap 95% interval over examples, and every
difference (receiver minus sender, reuse minus receiver) as a *paired* difference on the same
examples with its own interval. It checks the paper's benchmark rules (§2.1): the receiver reaches
its task's floor and beats its sender by at least 10 points.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ds_study import batched, data, metrics, runner

FLOORS = {"qa_f1": 40.0, "code_sim": 40.0, "rouge_l": 25.0}
MIN_MARGIN = 10.0
BOOTSTRAP = 2000


def interval(values, paired_with=None, seed: int = 0, reps: int = BOOTSTRAP) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap 95% interval of the mean, x100 like LongBench scores when
    given scores in [0, 1]; with ``paired_with``, of the mean of the per-example differences."""
    x = np.asarray(values, dtype=float)
    if paired_with is not None:
        x = x - np.asarray(paired_with, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


def fmt(ci: tuple[float, float, float], scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    m, lo, hi = (v * scale for v in ci)
    s = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return f"{s} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _config(name: str, split: str, limit: int | None, cells_root: str, batch_size: int = 16):
    return runner.compose("evaluate", [f"model_pair={name}", f"split={split}", f"cells_root={cells_root}",
                                       f"batch_size={batch_size}"] + ([f"limit={limit}"] if limit else []))


def score_family(root: Path, device: str, limit: int, pairs: list[tuple[str, str, str]]) -> list[dict]:
    """Receiver alone and sender alone of pairs of a freshly built family under ``root`` (``pairs``:
    (receiver, sender, task), variant folder names), on the first ``limit`` profiling examples with
    no cell store: how a recipe scores before it is committed (``scripts/zoo_sweep.py``)."""
    from ds_study.pair import load_pair
    from ds_study.plans import parse_plan

    rows = []
    for receiver, sender, task_name in pairs:
        task = data.TASKS[task_name]
        pair = load_pair(str(root / receiver), str(root / sender), device=device)
        examples = runner.prepare(pair, task, data.load_records(task_name, "profile")[:limit], 1024)
        ev = runner.Evaluator(pair, task, None)
        got = {plan: metrics.quality([ev.cell(parse_plan(plan, pair.n_layers), ex) for ex in examples])
               for plan in ("full_prefill", "sender")}
        rows.append({"receiver": receiver, "sender": sender, "task": task_name, "metric": task.metric,
                     "n": len(examples), "receiver_score": got["full_prefill"], "sender_score": got["sender"],
                     "example_prediction": ev.cell(parse_plan("full_prefill", pair.n_layers), examples[0])["prediction"]})
    return rows


def evaluate_pair(name: str, split: str, limit: int | None, batch_size: int, cells_root: str) -> dict:
    """Fill the pair's three baseline cells for every example (batched, resumable); its table row."""
    from ds_study.plans import parse_plan

    cfg = _config(name, split, limit, cells_root, batch_size)
    task = runner.validate(cfg)
    pair = runner.load_pair_from(cfg)
    examples, ev = runner.evaluator_for(cfg, pair, task)
    t0 = time.perf_counter()
    ev.fill([parse_plan(p, pair.n_layers) for p in batched.BASELINES], examples, desc=f"{name} ({split})")
    store = ev.store
    rows = {p: [store.get(p, ex.id) for ex in examples] for p in batched.BASELINES}
    score = {p: [r["score"] for r in rows[p]] for p in rows}
    nll = {p: [r["nll"] for r in rows[p]] for p in rows}
    kl = {p: [r["kl"] for r in rows[p]] for p in rows}
    recv, send, reuse = (interval(score[p]) for p in batched.BASELINES)
    margin = interval(score["full_prefill"], paired_with=score["sender"])
    reuse_loss = interval(score["full_reuse"], paired_with=score["full_prefill"])
    floor = FLOORS[task.metric]
    return {
        "pair": name, "receiver": pair.receiver_id["name"], "sender": pair.sender_id["name"], "task": task.name,
        "split": split, "n": len(examples), "metric": task.metric,
        "metric_version": metrics.get_metric(task.metric).version,
        "receiver_score": recv, "sender_score": send, "reuse_score": reuse,
        "margin": margin, "reuse_minus_receiver": reuse_loss,
        "nll": {p: interval(nll[p]) for p in nll},
        "nll_reuse_minus_receiver": interval(nll["full_reuse"], paired_with=nll["full_prefill"]),
        "kl_reuse": interval(kl["full_reuse"]),
        "floor": floor, "meets_floor": recv[0] * 100 >= floor, "meets_margin": margin[0] * 100 >= MIN_MARGIN,
        "seconds": round(time.perf_counter() - t0, 1), "batch_size": batch_size, "cells_file": str(store.path),
        "models": pair.identities(),
    }


def table(rows: list[dict]) -> str:
    lines = ["| pair | receiver <- sender | task (metric) | n | receiver | sender | margin (paired) | rules met | "
             "full reuse | reuse - receiver (paired) | NLL receiver | NLL reuse - receiver | KL reuse |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "yes" if r["meets_floor"] and r["meets_margin"] else "NO"
        lines.append(
            f"| {r['pair']} | {r['receiver']} <- {r['sender']} | {r['task']} ({r['metric']}) | {r['n']} | "
            f"{fmt(r['receiver_score'])} | {fmt(r['sender_score'])} | {fmt(r['margin'], sign=True)} | {ok} | "
            f"{fmt(r['reuse_score'])} | {fmt(r['reuse_minus_receiver'], sign=True)} | "
            f"{fmt(r['nll']['full_prefill'], 1, 3)} | {fmt(r['nll_reuse_minus_receiver'], 1, 3, sign=True)} | "
            f"{fmt(r['kl_reuse'], 1, 3)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=["smol_sum_code", "smol_sum", "smol_qa", "smol_code", "smol_qa_code"])
    ap.add_argument("--split", default="test", choices=["test", "profile"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cells-root", default="results/cells")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md (default: print only)")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be a positive number of examples")
    if args.batch_size < 1:
        ap.error("--batch-size must be positive")
    rows = []
    for p in args.pairs:  # the table is written after every pair: a long run keeps what it finished
        rows.append(evaluate_pair(p, args.split, args.limit, args.batch_size, args.cells_root))
        write(rows, args)
    print(table(rows))


def write(rows: list[dict], args) -> None:
    text = table(rows)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = (f"python -m ds_study.pairs --pairs {' '.join(args.pairs)} --split {args.split} --batch-size {args.batch_size}"
                   + (f" --limit {args.limit}" if args.limit else "") + f" --out {args.out}")
        out.with_suffix(".json").write_text(json.dumps({"command": command, "env": runner.environment("cpu"),
                                                        "bootstrap": {"reps": BOOTSTRAP, "level": 0.95},
                                                        "pairs": rows, "finished": len(rows),
                                                        "requested": list(args.pairs)}, indent=2) + "\n")
        note = ("Scores x100 with bootstrap 95% intervals over examples; differences are paired on the same "
                "examples. NLL: gold answer, nats per token, teacher-forced. KL: from the receiver's own "
                "full-prefill next-token distribution, nats, mean over the answer's positions.")
        done = "" if len(rows) == len(args.pairs) else f" ({len(rows)} of {len(args.pairs)} pairs finished so far)"
        out.with_suffix(".md").write_text(f"Produced by `{command}`{done}.\n\n{note}\n\n{text}\n")
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
