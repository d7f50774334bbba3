"""Tests for ds_study.data: task templates, record loading, prompt building. No network."""

from __future__ import annotations

import gzip
import json
import os
import sys
import types
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest

from ds_study import data
from ds_study.data import TASKS, build_prompt, context_stats, load_records, split_records

FIXTURES = Path(__file__).parent / "fixtures"

# Copied by hand from THUDM/LongBench config/dataset2prompt.json, independently of ds_study.data.
_MQA = ("Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based "
        "on the given passages. Only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:")
OFFICIAL = {
    "hotpotqa": _MQA,
    "2wikimqa": _MQA,
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                       "question based on the above text, only give me the answer and do not output any other "
                       "words.\n\nQuestion: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                  "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

EXPECTED = {  # name: (family, metric, max_new_tokens, source)
    "hotpotqa": ("qa", "qa_f1", 32, "longbench"),
    "2wikimqa": ("qa", "qa_f1", 32, "longbench"),
    "multifieldqa_en": ("qa", "qa_f1", 64, "longbench"),
    "multi_news": ("summarization", "rouge_l", 512, "longbench"),
    "lcc": ("code", "code_sim", 64, "longbench"),
    "repobench-p": ("code", "code_sim", 64, "longbench"),
    "pyqa": ("qa", "qa_f1", 32, "embedded"),
    "pysum": ("summarization", "rouge_l", 48, "embedded"),
    "pycode": ("code", "code_sim", 48, "embedded"),
}


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer with a BOS post-processor, trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t.template for t in TASKS.values()] + [
        (FIXTURES / "longbench_hotpotqa.jsonl").read_text(), (FIXTURES / "longbench_lcc.jsonl").read_text()]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


# ---------------------------------------------------------------------------------- templates


def test_all_nine_tasks_defined():
    assert set(TASKS) == set(EXPECTED)
    for name, (family, metric, max_new, source) in EXPECTED.items():
        t = TASKS[name]
        assert (t.name, t.family, t.metric, t.max_new_tokens, t.source) == (name, family, metric, max_new, source)
        assert "{context}" in t.prefix_template and "{input}" not in t.prefix_template
        assert "{context}" not in t.suffix_template
        assert t.description


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_longbench_split_reproduces_official_template(name):
    t = TASKS[name]
    assert t.prefix_template + t.suffix_template == OFFICIAL[name]
    assert t.prefix_template.endswith("{context}")


def test_repobench_suffix_starts_with_input():
    assert TASKS["repobench-p"].suffix_template.startswith("{input}")


def test_embedded_templates():
    pyqa, pysum, pycode = TASKS["pyqa"], TASKS["pysum"], TASKS["pycode"]
    assert pyqa.prefix_template.endswith("The following are given passages.\n{context}\n\n")
    assert pyqa.suffix_template.endswith("\n\nQuestion: {input}\nAnswer:")
    assert pyqa.template == OFFICIAL["hotpotqa"]  # same prompt, cut two newlines later
    assert pycode.prefix_template == "Please complete the code given below. \n{context}"
    assert pycode.template == OFFICIAL["lcc"]
    assert pysum.prefix_template == ("You are given the source code of several Python functions.\n\n"
                                     "Source:\n{context}\n\n")
    assert pysum.suffix_template == "Now, write a one-line summary of the function {input}.\n\nSummary:"


def test_taskspec_rejects_bad_spec():
    good = dict(name="x", family="qa", metric="qa_f1", prefix_template="{context}", suffix_template="{input}",
                max_new_tokens=8, source="embedded", description="d")
    data.TaskSpec(**good)
    for bad in ({"metric": "bleu"}, {"family": "chat"}, {"prefix_template": "{context}{input}"},
                {"prefix_template": "no context"}, {"max_new_tokens": 0}, {"source": "web"}):
        with pytest.raises(ValueError):
            data.TaskSpec(**(good | bad))


# ---------------------------------------------------------------------------------- records


def test_load_local_fixtures():
    hp = load_records("hotpotqa", path=FIXTURES / "longbench_hotpotqa.jsonl")
    lcc = load_records("lcc", path=str(FIXTURES / "longbench_lcc.jsonl"))
    assert len(hp) == 3 and len(lcc) == 3
    assert all(r["dataset"] == "hotpotqa" and isinstance(r["answers"], list) for r in hp)
    assert hp[2]["answers"] == ["1863", "1890"]
    assert all(r["input"] == "" and r["all_classes"] is None for r in lcc)
    assert isinstance(hp[0]["length"], int)
    assert load_records("hotpotqa", path=FIXTURES / "longbench_hotpotqa.jsonl", limit=2) == hp[:2]


def test_schema_error_names_line_and_key(tmp_path):
    lines = (FIXTURES / "longbench_hotpotqa.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    del bad["answers"]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*answers"):
        load_records("hotpotqa", path=p)
    p.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_records("hotpotqa", path=p)


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError) as e:
        load_records("narrativeqa")
    for name in TASKS:
        assert name in str(e.value)


def test_embedded_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "EMBEDDED_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="scripts/make_tasks.py"):
        load_records("pyqa", split="test")
    rec = json.loads((FIXTURES / "longbench_hotpotqa.jsonl").read_text().splitlines()[0])
    (tmp_path / "pyqa").mkdir()
    (tmp_path / "pyqa" / "profile.jsonl").write_text(json.dumps(rec) + "\n")
    with gzip.open(tmp_path / "pyqa" / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    assert load_records("pyqa", split="profile") == [rec]
    assert len(load_records("pyqa", split="train")) == 2
    with pytest.raises(ValueError, match="split"):
        load_records("pyqa", split="dev")


def test_longbench_hub_route(monkeypatch):
    calls = []
    rec = json.loads((FIXTURES / "longbench_lcc.jsonl").read_text().splitlines()[0])

    def ok(path, name, split):
        calls.append((path, name, split))
        return [rec]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=ok))
    assert load_records("lcc") == [rec]
    assert calls == [("Xnhyacinth/LongBench", "lcc", "test")]
    with pytest.raises(ValueError, match="split_records"):
        load_records("lcc", split="profile")

    def fail(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fail))
    from ds_study.data import DatasetUnavailable

    with pytest.raises(DatasetUnavailable, match=r"data\.zip.*dataset_path=/path/to/lcc\.jsonl"):  # the real key
        load_records("lcc")


def test_split_records():
    recs = list(range(120))
    assert split_records(recs, "profile") == list(range(50))
    assert split_records(recs, "test") == list(range(50, 120))
    assert split_records(recs, "test", profile_size=2) == list(range(2, 120))
    with pytest.raises(ValueError):
        split_records(recs, "train")


# ---------------------------------------------------------------------------------- prompts


def test_build_prompt_fits(tokenizer):
    rec = load_records("hotpotqa", path=FIXTURES / "longbench_hotpotqa.jsonl")[0]
    task = TASKS["hotpotqa"]
    p = build_prompt(rec, task, tokenizer, max_length=4096)
    assert not p.truncated
    assert p.prefix_text + p.suffix_text == OFFICIAL["hotpotqa"].format(**rec)
    assert p.prefix_ids[0] == tokenizer.bos_token_id
    assert p.prefix_ids == tokenizer.encode(p.prefix_text, add_special_tokens=True)
    assert p.suffix_ids == tokenizer.encode(p.suffix_text, add_special_tokens=False)
    assert tokenizer.bos_token_id not in p.suffix_ids
    assert p.input_ids == p.prefix_ids + p.suffix_ids and p.n_prefix == len(p.prefix_ids)
    # The prefix does not depend on the question: two questions share the sender's KV.
    other = build_prompt(rec | {"input": "Something else?"}, task, tokenizer, max_length=4096)
    assert other.prefix_ids == p.prefix_ids and other.suffix_ids != p.suffix_ids


def test_build_prompt_repobench_input_in_suffix(tokenizer):
    rec = load_records("lcc", path=FIXTURES / "longbench_lcc.jsonl")[0] | {"input": "x = 1\n"}
    p = build_prompt(rec, TASKS["repobench-p"], tokenizer, max_length=4096)
    assert p.suffix_text == "x = 1\nNext line of code:\n"
    assert "x = 1" not in p.prefix_text.replace(rec["context"], "")


def test_middle_truncation(tokenizer):
    task = TASKS["lcc"]
    rec = {"context": " ".join(f"w{i}" for i in range(400)), "input": ""}
    full = build_prompt(rec, task, tokenizer, max_length=100_000)
    max_length = 200
    p = build_prompt(rec, task, tokenizer, max_length=max_length)
    assert p.truncated and not full.truncated
    assert len(p.input_ids) == max_length - task.max_new_tokens
    assert p.suffix_ids == full.suffix_ids
    assert p.prefix_ids[0] == tokenizer.bos_token_id
    keep = p.n_prefix - 1
    first, last = (keep + 1) // 2, keep // 2
    assert p.prefix_ids[1:1 + first] == full.prefix_ids[1:1 + first]
    assert p.prefix_ids[1 + first:] == full.prefix_ids[-last:]
    assert p.prefix_text.startswith("Please complete the code given below.")
    assert p.prefix_text.endswith("w399")


def test_suffix_too_long(tokenizer):
    task = TASKS["hotpotqa"]
    rec = {"context": "short", "input": "why " * 200}
    with pytest.raises(ValueError, match="suffix"):
        build_prompt(rec, task, tokenizer, max_length=task.max_new_tokens + 50)


def test_context_stats(tokenizer):
    import numpy as np

    recs = load_records("hotpotqa", path=FIXTURES / "longbench_hotpotqa.jsonl")
    n = [len(tokenizer.encode(r["context"], add_special_tokens=False)) for r in recs]
    s = context_stats(recs, tokenizer)
    assert s["n"] == 3 and s["median"] == float(np.median(n))
    assert s["std"] == pytest.approx(float(np.std(n)))
    assert s["p95"] == pytest.approx(float(np.percentile(n, 95)))
    with pytest.raises(ValueError):
        context_stats([], tokenizer)
