"""Tests for ds_study.metrics: hand-worked values first, then agreement with the reference packages."""

import dataclasses

import pytest
from rapidfuzz import fuzz
from rouge import Rouge
from rouge_score import rouge_scorer
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from ds_study import metrics
from ds_study.metrics import (
    METRICS, Metric, aggregate, code_sim_score, get_metric, metric_versions, normalize_answer,
    qa_f1_score, rouge_score, rouge_score_stemmed, score_example, token_f1_score,
)

approx = pytest.approx


# -----------------------------------------------------------------------------
# normalize_answer / qa_f1


@pytest.mark.parametrize("raw, expected", [
    ("The Cat, sat!", "cat sat"),
    ("An apple a day", "apple day"),
    ("  Paris.\n\tFrance ", "paris france"),
    ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
    ("the-end", "theend"),                         # punctuation goes first, so no article is left
    ("A.", ""),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_qa_f1_hand_worked():
    # "cat sat" vs "cat sat down": 2 common, P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (5/3) = 0.8
    assert qa_f1_score("The cat sat", "a cat sat down") == approx(0.8)
    # bags, not sets: "cat cat cat" vs "cat" share one token, P = 1/3, R = 1, F1 = 0.5
    assert qa_f1_score("cat cat cat", "cat") == approx(0.5)
    assert qa_f1_score("Paris.", "paris") == 1.0
    assert qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0


def test_qa_f1_empty_and_disjoint_are_zero():
    assert qa_f1_score("", "") == 0.0  # LongBench: nothing in common -> 0, even when both empty
    assert qa_f1_score("", "paris") == 0.0
    assert qa_f1_score("london", "") == 0.0
    assert qa_f1_score("the a an", "the") == 0.0  # only articles -> empty after normalization
    assert qa_f1_score("london", "paris") == 0.0
    assert isinstance(qa_f1_score("london", "paris"), float)


# -----------------------------------------------------------------------------
# Rouge-L, both variants


def test_rouge_l_hand_worked():
    # The `rouge` package divides by the number of *distinct* words and counts the LCS as a set:
    # LCS "the cat on the mat" -> {the, cat, on, mat} = 4; 5 distinct words each side -> 4/5.
    # (textbook Rouge-L would give 5/6; Google's package does, see below)
    assert rouge_score("the cat sat on the mat", "the cat was on the mat") == approx(0.8, abs=1e-6)
    # no lowercasing, no stemming
    assert rouge_score("The cat", "the cat") == approx(0.5, abs=1e-6)
    assert rouge_score("cats running", "cat runs") == 0.0


@pytest.mark.parametrize("pred", ["", ".", "..."])
def test_rouge_l_package_error_scores_zero(pred):
    with pytest.raises(ValueError):  # the package itself refuses these ...
        Rouge().get_scores([pred], ["the cat sat"], avg=True)
    assert rouge_score(pred, "the cat sat") == 0.0  # ... and LongBench scores them 0


def test_rouge_l_any_exception_scores_zero(monkeypatch):
    class Broken:
        def get_scores(self, *args, **kwargs):
            raise RecursionError("deep LCS backtrace")
    monkeypatch.setattr(metrics, "Rouge", Broken)
    assert rouge_score("the cat sat", "the cat sat") == 0.0


def test_rouge_l_stemmed_hand_worked():
    # Porter stemmer: cats -> cat, running/runs -> run, so all of it matches
    assert rouge_score_stemmed("cats running", "cat runs") == approx(1.0)
    # plain LCS over tokens: 5 of 6 on both sides -> 5/6
    assert rouge_score_stemmed("the cat sat on the mat", "the cat was on the mat") == approx(5 / 6)
    # lowercases and drops punctuation
    assert rouge_score_stemmed("The cat, sat.", "the cat sat") == approx(1.0)
    assert rouge_score_stemmed("", "the cat sat") == 0.0


PAIRS = [
    ("the cat sat on the mat", "the cat was on the mat"),
    ("The quick brown fox. It jumped over the dog.", "A quick fox jumped over a lazy dog."),
    ("Revenue grew 3.5 percent in 2023", "revenue rose by 3.5 percent"),
    ("completely different words", "nothing shared here"),
    ("one two three four five six", "six five four three two one"),
]


@pytest.mark.parametrize("pred, gt", PAIRS)
def test_rouge_variants_match_reference_packages(pred, gt):
    expected_longbench = Rouge().get_scores([pred], [gt], avg=True)["rouge-l"]["f"]
    assert rouge_score(pred, gt) == expected_longbench
    expected_cacheblend = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(gt, pred)
    assert rouge_score_stemmed(pred, gt) == expected_cacheblend["rougeL"].fmeasure


def test_rouge_variants_disagree():
    # the two Rouge-L variants are not interchangeable; keeping them apart is the point
    pred, gt = PAIRS[0]
    assert abs(rouge_score(pred, gt) - rouge_score_stemmed(pred, gt)) > 0.03


# -----------------------------------------------------------------------------
# code_sim


def _lcs_len(a, b):
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _fuzzywuzzy_ratio(s1, s2):
    """fuzzywuzzy.fuzz.ratio with python-Levenshtein, written out: equal -> 100, one empty -> 0,
    else round(100 * (lensum - indel) / lensum) with indel = lensum - 2 * LCS."""
    if s1 == s2:
        return 100
    if not s1 or not s2:
        return 0
    return int(round(100 * 2 * _lcs_len(s1, s2) / (len(s1) + len(s2))))


def test_code_sim_hand_worked():
    assert code_sim_score("x = foo(1)", "x = foo(1)") == 1.0
    # "abc" vs "abd": LCS 2, InDel ratio 2 * 2 / 6
    assert code_sim_score("abc", "abd") == approx(2 / 3)
    # "return x" vs "return y": LCS 7 of 8 + 8 -> 14/16
    assert code_sim_score("return x", "return y") == approx(14 / 16)


def test_code_sim_skips_fences_and_comments():
    pred = "\n\n```python\n# set up\n// not python, still skipped\nx = foo(1)\ny = 2\n```"
    assert code_sim_score(pred, "x = foo(1)") == 1.0
    assert code_sim_score(pred, "y = 2") < 0.5  # only the first usable line counts


def test_code_sim_longbench_quirks():
    # a blank line after a comment is taken as the answer (lm-eval would skip it and score 1.0)
    assert code_sim_score("# compute\n\nx = 1", "x = 1") == 0.0
    # any '#' disqualifies a line, even inside a string literal
    assert code_sim_score('color = "#fff"\ny = 2', 'color = "#fff"') == approx(
        fuzz.ratio("y = 2", 'color = "#fff"') / 100)
    # only leading newlines are stripped, leading spaces are kept
    assert code_sim_score("\n    return x", "return x") == approx(16 / 20)


def test_code_sim_empty_cases():
    assert code_sim_score("", "x = 1") == 0.0
    assert code_sim_score("# only\n// comments\n```", "x = 1") == 0.0
    assert code_sim_score("", "") == 1.0  # both empty: equal strings (fuzzywuzzy also says 100)


CODE_PAIRS = [
    ("x = foo(1)", "x = foo(2)"),
    ("for i in range(10):", "for j in range(n):"),
    ("self.assertEqual(a, b)", "assert a == b"),
    ("return None", "pass"),
    ("abc", "abd"),
    ("", "x"),
    ("same", "same"),
]


@pytest.mark.parametrize("line, gt", CODE_PAIRS)
def test_code_sim_matches_rapidfuzz_and_fuzzywuzzy(line, gt):
    got = code_sim_score(line, gt)
    assert got == fuzz.ratio(line, gt) / 100
    # fuzzywuzzy (LongBench's library) computes the same ratio, rounded to a whole percent
    assert round(got * 100) == _fuzzywuzzy_ratio(line, gt)
    assert abs(got * 100 - _fuzzywuzzy_ratio(line, gt)) <= 0.5


# -----------------------------------------------------------------------------
# token_f1 (CacheBlend)


def _word_tokenizer():
    vocab = {w: i for i, w in enumerate(
        ["[UNK]", "cat", "sat", "down", "yes", "no", "nobody", "paris", "dog", "on", "mat"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return tok


class CharTokenizer:
    """Character-level fake with a BOS, like Llama tokenizers: forgetting add_special_tokens=False
    would add a shared BOS id to both sides and raise the score."""
    BOS = -1

    def encode(self, text, add_special_tokens=True):
        return ([self.BOS] if add_special_tokens else []) + [ord(c) for c in text]


def test_token_f1_hand_worked_words():
    tok = _word_tokenizer()
    # first line only: "the cat sat" -> [cat, sat] vs [cat, sat, down] -> P 1, R 2/3, F1 0.8
    assert token_f1_score("The cat sat\ndog dog dog", "a cat sat down", tok) == approx(0.8)
    assert token_f1_score("\n\nParis.", "paris", tok) == 1.0  # leading newlines, punctuation, case


def test_token_f1_counts_ids_without_special_tokens():
    tok = CharTokenizer()
    # "ab" vs "abcd": 2 common ids, P 1, R 1/2 -> 2/3 (with a BOS on both it would be 3/5 recall, 0.75)
    assert token_f1_score("ab", "abcd", tok) == approx(2 / 3)
    # ids, not words: "ab" vs "ba" share both characters
    assert token_f1_score("ab", "ba", tok) == 1.0
    assert qa_f1_score("ab", "ba") == 0.0


def test_token_f1_yes_no_collapse():
    tok = _word_tokenizer()
    assert token_f1_score("Yes, he did.", "yes", tok) == 1.0
    assert token_f1_score("No way", "no", tok) == 1.0
    # CacheBlend's quirk, kept on purpose: a first word starting with "no" becomes "No"
    assert token_f1_score("nobody", "nobody", tok) == 0.0
    assert qa_f1_score("nobody", "nobody") == 1.0


def test_token_f1_empty_cases():
    tok = _word_tokenizer()
    assert token_f1_score("", "", tok) == 1.0  # CacheBlend: both empty agree
    assert token_f1_score("", "paris", tok) == 0.0
    assert token_f1_score("\n\n", "paris", tok) == 0.0
    assert token_f1_score("paris", "the", tok) == 0.0  # reference empty after normalization
    assert token_f1_score("paris\nparis", "", tok) == 0.0


# -----------------------------------------------------------------------------
# registry


def test_registry_names_versions_and_labels():
    assert set(METRICS) == {"qa_f1", "rouge_l", "rouge_l_stemmed", "code_sim", "token_f1"}
    for name, m in METRICS.items():
        assert isinstance(m, Metric) and m.name == name
        assert m.version == "1"
        assert m.label and m.description
    assert METRICS["rouge_l"].fn is rouge_score
    assert METRICS["rouge_l_stemmed"].fn is rouge_score_stemmed
    assert "CacheBlend" in METRICS["rouge_l_stemmed"].label
    assert "CacheBlend" in METRICS["token_f1"].label
    assert "LongBench" in METRICS["rouge_l"].description


def test_metric_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        METRICS["qa_f1"].version = "2"


def test_metric_versions():
    assert metric_versions(["qa_f1", "code_sim"]) == {"qa_f1": "1", "code_sim": "1"}
    assert metric_versions([]) == {}
    with pytest.raises(ValueError):
        metric_versions(["qa_f1", "bleu"])


def test_get_metric_unknown_lists_available():
    assert get_metric("qa_f1") is METRICS["qa_f1"]
    with pytest.raises(ValueError) as err:
        get_metric("bleu")
    msg = str(err.value)
    assert "bleu" in msg
    for name in METRICS:
        assert name in msg


@pytest.mark.parametrize("name", ["qa_f1", "rouge_l", "rouge_l_stemmed", "code_sim"])
def test_scores_stay_in_unit_interval(name):
    m = get_metric(name)
    texts = ["", "\n", "The cat sat.", "x = foo(1)", "# c\nx", "the the the", "!!!", "a" * 50]
    for p in texts:
        for g in texts[1:]:
            s = m(p, g)
            assert isinstance(s, float) and 0.0 <= s <= 1.0, (name, p, g, s)


# -----------------------------------------------------------------------------
# per-example and per-dataset scores


def test_score_example_max_over_references():
    assert score_example("cat sat", ["dog", "cat sat down"], "qa_f1") == approx(0.8)
    assert score_example("cat sat", ["dog", "cat sat down", "The cat sat."], "qa_f1") == 1.0
    assert score_example("cat sat", ["dog"], "qa_f1") == 0.0
    assert score_example("cat sat", ["cat sat down"], METRICS["qa_f1"]) == approx(0.8)


def test_score_example_first_line_datasets():
    pred, answers = "\nParis\nLondon is big", ["london is big"]
    # whole prediction: "paris london is big" vs "london is big": P 3/4, R 1, F1 6/7
    assert score_example(pred, answers, "qa_f1") == approx(6 / 7)
    assert score_example(pred, answers, "qa_f1", dataset="hotpotqa") == approx(6 / 7)
    for ds in ["trec", "triviaqa", "samsum", "lsht"]:
        assert score_example(pred, answers, "qa_f1", dataset=ds) == 0.0
        assert score_example(pred, ["paris"], "qa_f1", dataset=ds) == 1.0


def test_score_example_passes_tokenizer():
    tok = _word_tokenizer()
    assert score_example("The cat sat", ["dog", "a cat sat down"], "token_f1", tokenizer=tok) == approx(0.8)
    with pytest.raises(TypeError):
        score_example("cat", ["cat"], "token_f1")  # token_f1 needs its tokenizer


def test_score_example_rejects_bad_answers():
    with pytest.raises(ValueError):
        score_example("cat", [], "qa_f1")
    with pytest.raises(TypeError):
        score_example("cat", "cat", "qa_f1")  # would otherwise be scored letter by letter
    with pytest.raises(ValueError, match="available"):
        score_example("cat", ["cat"], "exact_match")


def test_aggregate():
    assert aggregate([1.0, 0.5, 0.0]) == 50.0
    assert aggregate([1 / 3] * 3) == 33.33
    assert aggregate([2 / 3]) == 66.67
    assert aggregate([0.8, 1.0]) == 90.0
    with pytest.raises(ValueError):
        aggregate([])


def test_code_sim_early_stop_never_changes_the_score():
    """Decoding stops at the first prefix where code_sim_line_final holds; the score of that prefix's
    prediction (stripped, as runner.prediction_text does) must equal the full generation's."""
    import random

    from ds_study.metrics import code_sim_line_final, code_sim_score

    pieces = ["x = f(a)", "    ", "# note", "\n", "\n\n", "`", "// c", "return y", " ", "\t", "\u00a0", "z", "é"]
    rng = random.Random(0)
    stopped = 0
    for _ in range(3000):
        full = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        for gt in ("x = f(a)", "return y"):
            cut = next((n for n in range(1, len(full) + 1) if code_sim_line_final(full[:n])), None)
            if cut is None:
                continue
            stopped += 1
            assert code_sim_score(full[:cut].strip(), gt) == code_sim_score(full.strip(), gt), (full, cut)
    assert stopped > 1000  # the rule does fire, so the test exercises it
    assert code_sim_line_final("x = 1\ny") and not code_sim_line_final("x = 1\n  ")
    assert not code_sim_line_final("# only a comment\nx = 1")  # the scored line is not complete yet
