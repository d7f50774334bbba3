"""
Answer-quality metrics for LongBench-style evaluation.

Every number this project reports next to a speedup comes from here, so each scorer reproduces a
published convention rather than inventing one:

- qa_f1, rouge_l, code_sim: LongBench (THUDM/LongBench metrics.py and eval.py), which is what the
  DroidSpeak quality numbers are measured with.
- rouge_l_stemmed, token_f1: CacheBlend (YaoJiayi/CacheBlend example/utils.py), the same lab's
  earlier system, kept so our numbers can be set beside theirs. They are labelled as such.

A scorer is (prediction, ground_truth) -> float in [0, 1] (token_f1 also takes a tokenizer).
Per example we take the max over the reference answers, per dataset round(100 * mean, 2).
"""

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

from rapidfuzz import fuzz
from rouge import Rouge

# -----------------------------------------------------------------------------
# LongBench scorers

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD/LongBench normalization: lowercase, drop punctuation, drop articles, squash spaces.
    The order matters: punctuation goes before articles, so "the-end" becomes "theend", not "end"."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _bag_f1(pred_tokens: Sequence, gold_tokens: Sequence) -> float:
    """F1 between two bags (multisets) of tokens; 0 when they share nothing (so also when empty)."""
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """LongBench qa_f1_score: bag-of-words F1 after normalize_answer (hotpotqa, 2wikimqa, ...).
    Two empty answers score 0, not 1, as in LongBench."""
    return _bag_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def rouge_score(prediction: str, ground_truth: str) -> float:
    """LongBench's Rouge-L: the PyPI package `rouge` (no stemming; it splits text into sentences on
    "." and takes summary-level LCS), F of rouge-l. The package raises on an empty or
    punctuation-only hypothesis; LongBench scores any such failure 0.0 and so do we."""
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:
        return 0.0
    return float(scores["rouge-l"]["f"])


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """LongBench code_sim_score (lcc, repobench-p): the first line of the prediction that has no
    '`', '#' or '//' in it (so markdown fences and comments are skipped; "" if every line has one),
    compared with the reference line by Levenshtein (InDel) ratio.

    We follow LongBench, which takes the first such line even when it is blank; lm-evaluation-harness's
    port also skips blank lines, which gives different (higher) scores on predictions that start with
    an empty line after a comment.

    LongBench calls fuzzywuzzy's fuzz.ratio, which with python-Levenshtein computes the same ratio as
    rapidfuzz.fuzz.ratio but rounds it to a whole percent; we keep rapidfuzz's unrounded value.
    """
    line = next((c for c in prediction.lstrip("\n").split("\n") if _scorable_code_line(c)), "")
    return fuzz.ratio(line, ground_truth) / 100


def _scorable_code_line(line: str) -> bool:
    """A line code_sim_score may pick: no markdown fence, no comment marker."""
    return "`" not in line and "#" not in line and "//" not in line

def code_sim_line_final(text: str) -> bool:
    """True once more generated text can no longer change what ``code_sim_score`` scores.

    The score depends only on the first line with no '`', '#' or '//' of the stripped prediction.
    Once that line is complete and something other than whitespace follows it, later text neither
    changes which line it is nor (through the final strip) its trailing spaces. Decoding can stop
    there with the same score as a full-length generation: for code tasks, most of the
    ``max_new_tokens`` budget (64 in LongBench's lcc) is spent on lines that are never scored.
    """
    lines = text.lstrip().split("\n")
    for i, line in enumerate(lines[:-1]):
        if _scorable_code_line(line):
            return any(not c.isspace() and c != "\ufffd" for c in "\n".join(lines[i + 1:]))
    return False


def stop_rule(metric: str):
    """A ``text -> bool`` early-stop test that leaves ``metric``'s score unchanged, or None."""
    return code_sim_line_final if metric == "code_sim" else None


# -----------------------------------------------------------------------------
# CacheBlend scorers (for comparison with the same lab's earlier numbers)


@lru_cache(maxsize=1)
def _stemmed_rouge_scorer():
    # imported lazily: rouge_score pulls in nltk, which costs most of a second
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_score_stemmed(prediction: str, ground_truth: str) -> float:
    """CacheBlend's Rouge-L: Google's `rouge_score` package, rougeL with the Porter stemmer,
    fmeasure. It tokenizes differently from the `rouge` package (lowercases, drops non-alphanumerics,
    no sentence split), so its numbers are not comparable with LongBench's rouge_l."""
    return float(_stemmed_rouge_scorer().score(ground_truth, prediction)["rougeL"].fmeasure)


def _cacheblend_first_line(s: str) -> str:
    """CacheBlend's parse_generation: keep the first line; collapse yes/no answers.
    Quirks kept on purpose: any line starting with "Yes"/"yes" (also "Yesterday") becomes "Yes",
    any whose first word starts with "No"/"no" (also "November", "none") becomes "No".
    CacheBlend raises on an empty line; we leave it empty instead."""
    s = s.lstrip("\n").split("\n")[0]
    words = s.split()
    if s.startswith(("Yes", "yes")):
        return "Yes"
    if words and words[0].startswith(("No", "no")):
        return "No"
    return s


def _token_ids(tokenizer, text: str) -> list:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(ids, "ids", ids))  # a raw `tokenizers.Tokenizer` returns an Encoding


def token_f1_score(prediction: str, ground_truth: str, tokenizer) -> float:
    """CacheBlend's compute_f1: first line of the prediction (see _cacheblend_first_line), both sides
    normalize_answer'd, then bag F1 over the model tokenizer's token ids instead of words.
    CacheBlend drops the first id of encode() (the BOS); we ask for no special tokens instead, which
    is the same for BOS-prefixing tokenizers and right for those without a BOS.
    Unlike qa_f1, if either side has no tokens the score is 1.0 when both are empty, else 0.0."""
    pred_ids = _token_ids(tokenizer, normalize_answer(_cacheblend_first_line(prediction)))
    gold_ids = _token_ids(tokenizer, normalize_answer(ground_truth))
    if not pred_ids or not gold_ids:
        return float(pred_ids == gold_ids)
    return _bag_f1(pred_ids, gold_ids)

# -----------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Metric:
    """A named, versioned scorer.

    `version` is bumped whenever the scoring changes in any way that can move a number, and every
    result file records the versions of the metrics it used, so numbers scored differently are
    never compared by accident.
    """
    name: str
    fn: Callable[..., float]
    version: str
    label: str        # short, for tables and plot axes
    description: str  # where the convention comes from

    def __call__(self, prediction: str, ground_truth: str, **kw) -> float:
        return self.fn(prediction, ground_truth, **kw)


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("qa_f1", qa_f1_score, "1", "F1",
           "LongBench qa_f1_score: normalized bag-of-words F1"),
    Metric("rouge_l", rouge_score, "1", "Rouge-L",
           "LongBench rouge_score: PyPI `rouge` rouge-l F, no stemming, 0.0 on error"),
    Metric("rouge_l_stemmed", rouge_score_stemmed, "1", "Rouge-L (stemmed, CacheBlend)",
           "CacheBlend compute_rl: Google `rouge_score` rougeL fmeasure with Porter stemmer"),
    Metric("code_sim", code_sim_score, "1", "Code Sim",
           "LongBench code_sim_score: first non-comment line, Levenshtein ratio (rapidfuzz, unrounded)"),
    Metric("token_f1", token_f1_score, "1", "Token F1 (CacheBlend)",
           "CacheBlend compute_f1: first line, yes/no collapse, normalized, F1 over tokenizer ids"),
]}


def get_metric(name: str) -> Metric:
    """Look a metric up by name; an unknown name is an error that lists the known ones."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def metric_versions(names: Iterable[str]) -> dict[str, str]:
    """{name: version} for the metrics a run used, to be written into its result file."""
    return {name: get_metric(name).version for name in names}

# -----------------------------------------------------------------------------
# per-example and per-dataset scores

# LongBench scores only the first line of the prediction on these few-shot datasets
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def score_example(prediction: str, answers: Sequence[str], metric: "str | Metric",
                  dataset: str | None = None, **kw) -> float:
    """LongBench's per-example score: the best score over all reference answers.
    Extra keyword arguments go to the scorer (token_f1 needs tokenizer=...).
    An empty answer list raises (LongBench would silently score it 0)."""
    if isinstance(answers, str):
        raise TypeError("answers must be a list of reference strings, not a single string")
    if len(answers) == 0:
        raise ValueError("no reference answers to score against")
    if isinstance(metric, str):
        metric = get_metric(metric)
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max(metric(prediction, answer, **kw) for answer in answers)


def aggregate(scores: Sequence[float]) -> float:
    """LongBench's per-dataset score: round(100 * mean, 2). Empty input is an error, not 0."""
    if len(scores) == 0:
        raise ValueError("cannot aggregate an empty list of scores")
    return round(100 * sum(scores) / len(scores), 2)


# --------------------------------------------------------------------------------------------
# Quality targets of profiling and search

TARGETS = {
    "task": "the task metric (F1, Rouge-L, code similarity) of the greedy answer",
    "nll": "exp(-NLL): the gold answer's per-token probability (geometric mean), teacher-forced",
    "kl": "exp(-KL): closeness of the next-token distributions to the receiver's own full prefill",
}


def example_value(row: dict, target: str = "task") -> float:
    """One cell's quality in [0, 1], higher is better, under ``target`` (see TARGETS). The continuous
    targets need no decoding and do not saturate; mapped through exp(-x) they sit on the same 0-100
    scale as task metrics, so frontiers, deltas and selection read the same way."""
    if target == "task":
        return row["score"]
    if target in ("nll", "kl"):
        if target not in row:
            raise KeyError(f"cell {row.get('plan')}/{row.get('id')} has no {target!r}: recompute it (cells made "
                           f"before the continuous signals are recomputed on the next run)")
        return math.exp(-row[target])
    raise ValueError(f"unknown quality target {target!r}; one of {', '.join(TARGETS)}")


def quality(rows: Sequence[dict], target: str = "task") -> float:
    """A plan's quality over examples: round(100 * mean per-example value, 2), as LongBench aggregates."""
    return aggregate([example_value(r, target) for r in rows])
