"""Quality of receiver and sender of each embedded pair on its task's test split (issue: foundation).

    python scripts/pair_quality.py [--pairs tiny tiny_qa tiny_base tiny_sum] [--split test] [--limit N]

Checks the paper's benchmark rules (§2.1) on the embedded family: the receiver was fine-tuned for
the pair's task and beats the sender there by at least 10 points, and reaches the quality floor
(40 F1 / 40 code similarity / 25 Rouge-L). Writes results/pair_quality.{json,md}; cells are
cached under results/cells, so a rerun only evaluates what is missing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from tqdm import tqdm

from ds_study import metrics, runner
from ds_study.executor import parse_plan

FLOORS = {"qa_f1": 40.0, "code_sim": 40.0, "rouge_l": 25.0}
MIN_MARGIN = 10.0


def evaluate_pair(name: str, split: str, limit: int | None) -> dict:
    with initialize_config_dir(str(runner.CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_pair={name}", f"split={split}"] + ([f"limit={limit}"] if limit else []))
    task = runner.validate(cfg)
    records = runner.records_of(cfg, task)
    pair = runner.load_pair_from(cfg)
    examples = runner.prepare(pair, task, records, cfg.max_length)
    store = runner.CellStore(Path(cfg.cells_root) / name, pair, task, split, cfg.max_length)
    ev = runner.Evaluator(pair, task, store)
    plans = [parse_plan("full_prefill", pair.n_layers), parse_plan("sender", pair.n_layers)]
    rows = {p.name: [] for p in plans}
    t0 = time.perf_counter()
    for ex in tqdm(examples, desc=name, dynamic_ncols=True):
        for p in plans:
            rows[p.name].append(ev.cell(p, ex))
    receiver, sender = runner.quality(rows["full_prefill"]), runner.quality(rows["sender"])
    floor = FLOORS[task.metric]
    return {"pair": name, "receiver": pair.receiver_id["name"], "sender": pair.sender_id["name"], "task": task.name,
            "split": split, "n": len(examples), "metric": task.metric,
            "metric_version": metrics.get_metric(task.metric).version,
            "receiver_score": receiver, "sender_score": sender, "margin": round(receiver - sender, 2),
            "floor": floor, "meets_floor": receiver >= floor, "meets_margin": receiver - sender >= MIN_MARGIN,
            "seconds": round(time.perf_counter() - t0, 1), "models": pair.identities()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=["tiny", "tiny_qa", "tiny_base", "tiny_sum"])
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default="results/pair_quality")
    args = ap.parse_args()
    rows = [evaluate_pair(p, args.split, args.limit) for p in args.pairs]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = (f"python scripts/pair_quality.py --pairs {' '.join(args.pairs)} --split {args.split} --out {args.out}"
               + (f" --limit {args.limit}" if args.limit else ""))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "env": runner.environment("cpu"),
                                                    "pairs": rows}, indent=2) + "\n")
    lines = ["| pair | receiver <- sender | task (metric) | n | receiver | sender | margin | floor | rules met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "yes" if r["meets_floor"] and r["meets_margin"] else "NO"
        lines.append(f"| {r['pair']} | {r['receiver']} <- {r['sender']} | {r['task']} ({r['metric']}) | {r['n']} | "
                     f"{r['receiver_score']:.2f} | {r['sender_score']:.2f} | {r['margin']:+.2f} | {r['floor']:.0f} | {ok} |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(f"Produced by `{command}`.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
