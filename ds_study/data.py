"""Tasks, records and prompts: what the sender and the receiver model are asked to read.

DroidSpeak shares the KV cache of a long *context* between two models. Every prompt is therefore
cut into two parts:

- the **prefix** (instruction + context): the sender computes its KV, the receiver reuses it;
- the **suffix** (question + answer cue): the receiver always computes it itself.

Templates follow LongBench's official ``config/dataset2prompt.json`` (THUDM/LongBench), split right
after ``{context}``, so that ``prefix + suffix`` is the official prompt. Records use LongBench's
schema (``input, context, answers, length, dataset, language, all_classes, _id``) for every task,
including the small embedded Python tasks that ship with the package.
"""

from __future__ import annotations

import gzip
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("qa", "summarization", "code")
METRICS = ("qa_f1", "rouge_l", "code_sim")  # names of the scorers in ds_study.metrics
SOURCES = ("embedded", "longbench")
SCHEMA_KEYS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")

EMBEDDED_ROOT = Path(__file__).resolve().parent / "assets" / "tasks"
SPLITS = ("train", "profile", "test")
PROFILE_SIZE = 50  # DroidSpeak profiles each pair on 50 HotpotQA contexts (paper §5.2)

# Parquet copy of THUDM/LongBench (one config per subset, split "test"). THUDM/LongBench itself is
# a loading-script dataset, which `datasets` >= 4.0 refuses; lm-evaluation-harness uses this copy.
LONGBENCH_HUB_PATH = "Xnhyacinth/LongBench"

# Verbatim from THUDM/LongBench config/dataset2prompt.json.
_MQA = (
    "Answer the question based on the given passages. Only give me the answer and do not output any "
    "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
    "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
    "Answer:"
)
LONGBENCH_PROMPTS: dict[str, str] = {
    "hotpotqa": _MQA,
    "2wikimqa": _MQA,
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}"
        "\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task: how to turn a record into a (shared prefix, private suffix) prompt.

    ``prefix_template`` holds ``{context}`` and nothing record-specific after it, so that two
    questions over the same context share the same prefix KV; ``suffix_template`` may hold
    ``{input}``. ``metric`` names a scorer in ``ds_study.metrics``.
    """

    name: str
    family: str
    metric: str
    prefix_template: str
    suffix_template: str
    max_new_tokens: int
    source: str
    description: str

    def __post_init__(self) -> None:
        # Fail at import time rather than mid-run with a half-shared prompt.
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family {self.family!r} not in {FAMILIES}")
        if self.metric not in METRICS:
            raise ValueError(f"{self.name}: metric {self.metric!r} not in {METRICS}")
        if self.source not in SOURCES:
            raise ValueError(f"{self.name}: source {self.source!r} not in {SOURCES}")
        if "{context}" not in self.prefix_template or "{input}" in self.prefix_template:
            raise ValueError(f"{self.name}: prefix must contain {{context}} and not {{input}}")
        if "{context}" in self.suffix_template:
            raise ValueError(f"{self.name}: suffix must not contain {{context}}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"{self.name}: max_new_tokens must be positive")

    @property
    def template(self) -> str:
        """The full prompt template (for LongBench tasks: the official one)."""
        return self.prefix_template + self.suffix_template


def split_template(template: str) -> tuple[str, str]:
    """Split a full template right after ``{context}``: (prefix, suffix)."""
    cut = template.index("{context}") + len("{context}")
    return template[:cut], template[cut:]


def _longbench(name: str, family: str, metric: str, max_new_tokens: int, description: str) -> TaskSpec:
    prefix, suffix = split_template(LONGBENCH_PROMPTS[name])
    return TaskSpec(name, family, metric, prefix, suffix, max_new_tokens, "longbench", description)


_PYQA_INSTR = ("Answer the question based on the given passages. Only give me the answer and do not "
               "output any other words.\n\n")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _longbench("hotpotqa", "qa", "qa_f1", 32, "LongBench multi-hop QA over Wikipedia passages"),
        _longbench("2wikimqa", "qa", "qa_f1", 32, "LongBench multi-hop QA (2WikiMultihopQA)"),
        _longbench("multifieldqa_en", "qa", "qa_f1", 64, "LongBench single-document QA, many fields"),
        _longbench("multi_news", "summarization", "rouge_l", 512, "LongBench multi-document news summary"),
        _longbench("lcc", "code", "code_sim", 64, "LongBench next-line code completion, one file"),
        _longbench("repobench-p", "code", "code_sim", 64,
                   "LongBench next-line code completion with cross-file context"),
        TaskSpec(
            "pyqa", "qa", "qa_f1",
            _PYQA_INSTR + "The following are given passages.\n{context}\n\n",
            _PYQA_INSTR + "Question: {input}\nAnswer:",
            32, "embedded",
            "Embedded multi-passage QA about Python stdlib functions (module / parameters); hotpotqa prompt",
        ),
        TaskSpec(
            "pysum", "summarization", "rouge_l",
            "You are given the source code of several Python functions.\n\nSource:\n{context}\n\n",
            "Now, write a one-line summary of the function {input}.\n\nSummary:",
            48, "embedded",
            "Embedded one-line docstring summary of one of several Python stdlib functions",
        ),
        TaskSpec(
            "pycode", "code", "code_sim",
            "Please complete the code given below. \n{context}",
            "Next line of code:\n",
            48, "embedded",
            "Embedded next-line completion of Python stdlib source; lcc prompt",
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Records


def _task(dataset: str) -> TaskSpec:
    try:
        return TASKS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(TASKS)}") from None


def validate_record(record: Any, where: str) -> dict:
    """Check one record against LongBench's schema; ``where`` names it in the error."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in SCHEMA_KEYS if k not in record]
    if missing:
        raise ValueError(f"{where}: record is missing key(s) {missing}")
    if not isinstance(record["context"], str) or not isinstance(record["input"], str):
        raise ValueError(f"{where}: 'context' and 'input' must be strings")
    if not isinstance(record["answers"], list) or not record["answers"]:
        raise ValueError(f"{where}: 'answers' must be a non-empty list")
    return record


def read_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a LongBench-schema JSONL file (``.jsonl`` or ``.jsonl.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            records.append(validate_record(obj, f"{path}:{lineno}"))
    return records


def _embedded_file(dataset: str, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {dataset}; available: {', '.join(SPLITS)}")
    base = EMBEDDED_ROOT / dataset
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):  # make_tasks.py gzips the train split
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(
        f"embedded task data {base / (split + '.jsonl')} not found; "
        "regenerate it with `python scripts/make_tasks.py`"
    )


class DatasetUnavailable(RuntimeError):
    """A LongBench subset that can be neither downloaded nor read locally (a user error: the
    message says how to get the file)."""


def _load_longbench(dataset: str) -> list[dict]:
    try:
        import datasets  # imported here: the embedded tasks and local files do not need it

        rows = datasets.load_dataset(LONGBENCH_HUB_PATH, dataset, split="test")
        rows = [dict(r) for r in rows]
    except Exception as e:  # noqa: BLE001 - any failure gets the same way out
        raise DatasetUnavailable(
            f"could not load LongBench {dataset!r} from the Hub ({LONGBENCH_HUB_PATH}): "
            f"{type(e).__name__}: {e}. Download LongBench's data.zip "
            "(https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip), unzip it and "
            f"pass dataset_path=/path/to/{dataset}.jsonl (or dataset_dir=/path/to, for every LongBench dataset)"
        ) from e
    return [validate_record(r, f"{LONGBENCH_HUB_PATH}/{dataset}[{i}]") for i, r in enumerate(rows)]


def longbench_file(root: str | Path, dataset: str) -> Path:
    """``root/<dataset>.jsonl`` (or ``.jsonl.gz``): one LongBench subset where LongBench's data.zip was
    unzipped (``dataset_dir``), so that every LongBench dataset of a job is read offline."""
    for name in (f"{dataset}.jsonl", f"{dataset}.jsonl.gz"):
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise FileNotFoundError(
        f"dataset_dir={root} has no {dataset}.jsonl; unzip LongBench's data.zip "
        "(https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip) there, or drop dataset_dir to "
        "load it from the Hub")


def load_records(dataset: str, split: str = "test", path: str | Path | None = None,
                 limit: int | None = None) -> list[dict]:
    """Load the records of one task, validated against LongBench's schema.

    - ``path`` given: that local JSONL file is read as is (``split`` is not applied), for any task
      in ``TASKS`` -- the way to use LongBench's ``data.zip`` files offline.
    - embedded task: ``EMBEDDED_ROOT/<dataset>/<split>.jsonl`` (train: ``.jsonl.gz``).
    - LongBench task: the Hub parquet copy. LongBench has only a "test" split, and all of it is
      returned; hold out the profiling contexts with :func:`split_records`.

    ``limit`` keeps the first ``limit`` records.
    """
    task = _task(dataset)
    if path is not None:
        records = read_jsonl(path)
    elif task.source == "embedded":
        records = read_jsonl(_embedded_file(dataset, split))
    else:
        if split != "test":
            raise ValueError(
                f"LongBench has only a 'test' split (got {split!r}); load 'test' and use "
                "split_records() to separate the profiling records"
            )
        records = _load_longbench(dataset)
    return records if limit is None else records[:limit]


def split_records(records: list[dict], split: str, profile_size: int = PROFILE_SIZE) -> list[dict]:
    """Carve a profiling set out of a test-only dataset such as LongBench.

    DroidSpeak profiles each model pair on 50 HotpotQA contexts to choose the layers to recompute.
    We hold those records out of the test set so the reported quality is not measured on the data
    the plan was tuned on: "profile" is the first ``profile_size`` records, "test" the rest.
    """
    if profile_size < 0:
        raise ValueError("profile_size must be >= 0")
    if split == "profile":
        return records[:profile_size]
    if split == "test":
        return records[profile_size:]
    raise ValueError(f"split_records: split must be 'profile' or 'test', got {split!r}")


# --------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    """Token ids of one prompt, split where the sender's KV ends.

    ``prefix_text`` is the text of the kept prefix (decoded from the ids when truncated); the ids
    are what the models see.
    """

    prefix_ids: list[int]
    suffix_ids: list[int]
    prefix_text: str
    suffix_text: str
    truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        return self.prefix_ids + self.suffix_ids

    @property
    def n_prefix(self) -> int:
        return len(self.prefix_ids)


def build_prompt(record: dict, task: TaskSpec, tokenizer: Any, max_length: int) -> Prompt:
    """Format and tokenize one record so that it fits ``max_length`` with room to generate.

    Prefix and suffix are tokenized separately on purpose: the sender and the receiver then share
    exactly the same prefix ids, and every plan (full prefill, reuse, partial recompute) sees the
    same ids. The prefix gets the special tokens (BOS), the suffix none.

    If ``prefix + suffix > max_length - task.max_new_tokens``, the prefix is cut in the middle
    (first half + last half of its ids, as LongBench does, BOS kept) and ``truncated`` is set.
    Raises ValueError if not even BOS, one context token and the suffix fit.
    """
    prefix_text = task.prefix_template.format(context=record["context"], input=record["input"])
    suffix_text = task.suffix_template.format(context=record["context"], input=record["input"])
    # verbose=False: transformers would warn that a context longer than the model's maximum "will
    # result in indexing errors", but such a prompt is middle-truncated below before any model sees it
    prefix_ids = list(tokenizer.encode(prefix_text, add_special_tokens=True, verbose=False))
    suffix_ids = list(tokenizer.encode(suffix_text, add_special_tokens=False, verbose=False))

    budget = max_length - task.max_new_tokens
    if len(prefix_ids) + len(suffix_ids) <= budget:
        return Prompt(prefix_ids, suffix_ids, prefix_text, suffix_text, truncated=False)

    bos = getattr(tokenizer, "bos_token_id", None)
    n_head = 1 if bos is not None and prefix_ids and prefix_ids[0] == bos else 0
    keep = budget - len(suffix_ids) - n_head  # prefix tokens left for the context
    if keep < 1:
        raise ValueError(
            f"{task.name}: suffix ({len(suffix_ids)} tokens) does not fit max_length={max_length} "
            f"minus max_new_tokens={task.max_new_tokens}"
        )
    body = prefix_ids[n_head:]
    first, last = (keep + 1) // 2, keep // 2
    kept = prefix_ids[:n_head] + body[:first] + body[len(body) - last:]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Prompt(kept, suffix_ids, text, suffix_text, truncated=True)


def answer_ids(tokenizer: Any, task: TaskSpec, answer: str) -> list[int]:
    """The gold answer as the model should produce it after the suffix: a leading space except for
    code, at most ``max_new_tokens - 1`` tokens, then EOS. Fine-tuning targets and the teacher-forced
    NLL both use this."""
    ids = tokenizer(answer if task.family == "code" else " " + answer, add_special_tokens=False)["input_ids"]
    return ids[: task.max_new_tokens - 1] + [tokenizer.eos_token_id]


def context_stats(records: list[dict], tokenizer: Any) -> dict:
    """Context length in tokens (no special tokens), as in the paper's dataset table (§5.2).

    ``std`` is the population standard deviation; ``p95`` interpolates linearly between ranks.
    """
    if not records:
        raise ValueError("context_stats: no records")
    n = sorted(len(tokenizer.encode(r["context"], add_special_tokens=False, verbose=False)) for r in records)
    rank = 0.95 * (len(n) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(n) - 1)
    p95 = n[lo] + (n[hi] - n[lo]) * (rank - lo)
    return {
        "n": len(n),
        "mean": statistics.fmean(n),
        "median": statistics.median(n),
        "std": statistics.pstdev(n),
        "p95": p95,
        "min": n[0],
        "max": n[-1],
    }
