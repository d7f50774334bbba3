"""Model-free baselines on the embedded tasks: what a receiver must beat to show it learned anything.

Each baseline is a fixed rule (constants are chosen on the train split, never on the scored split),
scored with the task's own metric and LongBench aggregation. Two kinds:

- context-free rules (a constant answer, a template of the question's name): the level a model
  reaches from answer-format statistics alone;
- copy rules (take a line or a span from the context): the level reached by looking the answer up in
  the context and copying it, which is the ability the quality floors (40 F1 / 40 code similarity /
  25 Rouge-L) require and cross-model KV reuse can damage.

``table`` scores every rule on a split next to the receivers' scores of results/pair_quality.json;
``scripts/heuristic_baselines.py`` writes it to results/heuristic_baselines.{json,md}. No model is
loaded.
"""

from __future__ import annotations

import collections
import difflib
import json
import re
from pathlib import Path

from ds_study import metrics
from ds_study.data import load_records

TASK_METRICS = {"pycode": "code_sim", "pysum": "rouge_l", "pyqa": "qa_f1"}


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.split("\n") if ln.strip()]


def _name_words(name: str) -> str:
    return " ".join(w for w in re.split(r"[_\W]+", name) if w)


def _majority(train: list[dict]) -> str:
    """The most frequent reference answer on the train split (ties: first seen)."""
    return collections.Counter(r["answers"][0] for r in train).most_common(1)[0][0]


# pycode: the next line of a source file ------------------------------------------------------


def code_previous_line(r: dict) -> str:
    return _lines(r["context"])[-1]


def code_line_induction(r: dict) -> str:
    """Successor of the earlier context line most similar to the last one (a line-level induction head)."""
    lines = _lines(r["context"])
    last, best, best_sim = lines[-1], lines[-1], -1.0
    for i in range(len(lines) - 2):
        sim = difflib.SequenceMatcher(None, lines[i], last).ratio()
        if sim > best_sim:
            best_sim, best = sim, lines[i + 1]
    return best


# pysum: the first docstring line of the named function ----------------------------------------


def sum_docstring_lookup(r: dict) -> str:
    """First docstring line of ``def <name>(`` in the context: lookup and copy. Only the function's own
    docstring counts, the first statement after its signature (a function without one gives "")."""
    ctx = r["context"]
    start = ctx.find(f"def {r['input'].strip()}(")
    if start < 0:
        return ""
    end = re.compile(r"\)[^\n]*:[ \t]*(#[^\n]*)?\n").search(ctx, start)  # the signature's last line
    if end is None:
        return ""
    m = re.match(r"\s*[rRuU]?(\"\"\"|'''|\"|')\s*", ctx[end.end():])  # triple- or single-quoted
    if m is None:
        return ""
    body = ctx[end.end() + m.end():]
    return next((ln.strip() for ln in body.split("\n") if ln.strip()), "").split(m.group(1))[0].strip()


# pyqa: the signature of the named function -----------------------------------------------------


def _qa_name(r: dict) -> str:
    m = re.search(r"function (\S+)\?", r["input"])
    return m.group(1) if m else r["input"]


def qa_signature_lookup(r: dict) -> str:
    """The Signature line of the passage whose header names the function: lookup and copy."""
    name = _qa_name(r)
    m = re.search(r"^" + re.escape(name) + r" from module \S+\nSignature: (.*)$", r["context"], re.M)
    return m.group(1).strip() if m else ""


def baselines(train: dict[str, list[dict]]) -> dict[str, list[tuple[str, str, object]]]:
    """Per task: (name, kind, rule(record) -> prediction)."""
    code_const, sum_const, qa_const = (_majority(train[t]) for t in ("pycode", "pysum", "pyqa"))
    return {
        "pycode": [
            (f"constant: most frequent train answer {code_const!r}", "context-free", lambda r: code_const),
            ("previous non-empty context line", "copy", code_previous_line),
            ("line induction: successor of the context line most like the last one", "copy", code_line_induction),
            ("oracle: best single context line (ceiling of whole-line copying)", "oracle",
             lambda r: max(_lines(r["context"]), key=lambda ln: max(metrics.code_sim_score(ln, a)
                                                                    for a in r["answers"]))),
        ],
        "pysum": [
            (f"constant: most frequent train answer {sum_const!r}", "context-free", lambda r: sum_const),
            ("template: 'Return the <name words>.'", "context-free",
             lambda r: f"Return the {_name_words(r['input'].strip())}."),
            ("lookup: first docstring line of def <name>( in the context", "copy", sum_docstring_lookup),
        ],
        "pyqa": [
            (f"constant: most frequent train answer {qa_const!r}", "context-free", lambda r: qa_const),
            ("echo: '<name>()' from the question", "context-free", lambda r: f"{_qa_name(r)}()"),
            ("lookup: Signature line of the passage that names the function", "copy", qa_signature_lookup),
        ],
    }


def score(rule, records: list[dict], metric: str) -> float:
    fn = metrics.get_metric(metric)
    return metrics.aggregate([metrics.score_example(rule(r), r["answers"], fn) for r in records])


def table(split: str, pair_quality: Path) -> list[dict]:
    """One row per task and rule (scored on ``split``), then the task's receiver as the pair-quality
    table ``pair_quality`` (the 2M family's, results/pair_quality.json) has it."""
    train = {t: load_records(t, "train") for t in TASK_METRICS}
    quality = json.loads(Path(pair_quality).read_text())["pairs"]
    rows = []
    for task, rules in baselines(train).items():
        records = load_records(task, split)
        metric = TASK_METRICS[task]
        for name, kind, rule in rules:
            rows.append({"task": task, "metric": metric, "metric_version": metrics.get_metric(metric).version,
                         "split": split, "n": len(records), "baseline": name, "kind": kind,
                         "score": round(score(rule, records, metric), 2)})
        for q in quality:
            if q["task"] == task and q["split"] == split:
                rows.append({"task": task, "metric": metric, "split": split, "n": q["n"],
                             "baseline": f"receiver {q['receiver']} (pair {q['pair']}, results/pair_quality.json)",
                             "kind": "model", "score": round(q["receiver_score"], 2)})
                break
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Produced by `{command}`. Context-free and copy rules use no model; constants come from the "
             "train split. Model rows are copied from `results/pair_quality.json`.", "",
             "| task (metric) | baseline | kind | n | score |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} ({r['metric']}) | {r['baseline']} | {r['kind']} | {r['n']} | {r['score']:.2f} |"
              for r in rows]
    return "\n".join(lines) + "\n"
