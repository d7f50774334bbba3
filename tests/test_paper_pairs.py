"""The paper's pairs (ds_study/conf/model_pair/paper_*.yaml) and scripts/paper_study.py, offline: tiny random
stand-ins of each pair's architecture and tokenizers saved in a temporary Hugging Face cache under the real
Hub ids (tests/paper_cache.py), a tiny LongBench directory, and the script run on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from paper_cache import PAIRS, build_cache, pair_yaml, snapshot, write_longbench_dir

from ds_study import runner
from ds_study.data import TASKS
from ds_study.pair import DTYPES

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(p.stem for p in (runner.CONF_DIR / "model_pair").glob("paper_*.yaml"))
RUN = ["paper_llama31_70b"]  # instruct <- base: two EOS tokens, no pad token, Llama-3.1 rope scaling


def test_every_paper_pair_config_is_complete():
    assert set(PAPER) == set(PAIRS)  # each has a tiny stand-in below
    assert not (runner.CONF_DIR / "model_pair" / "mistrallite.yaml").exists()  # renamed paper_mistrallite
    for name in PAPER:
        text = (runner.CONF_DIR / "model_pair" / f"{name}.yaml").read_text()
        mp = OmegaConf.load(runner.CONF_DIR / "model_pair" / f"{name}.yaml")
        assert mp.name == name and text.startswith("#")
        assert "# Hub ids:" in text and "inferred" in text  # says which ids are the paper's and which are not
        for ref in (mp.receiver, mp.sender):
            assert ref.count("/") == 1 and not ref.startswith((".", "/", "~"))  # Hub ids
        assert mp.task in mp.datasets and set(mp.datasets) <= set(TASKS)
        assert mp.run.dtype in DTYPES and mp.run.device == "cuda" and mp.run.max_length > 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    build_cache(tmp / "hub", PAPER)
    datasets = sorted({d for n in PAPER for d in pair_yaml(n).datasets})
    write_longbench_dir(tmp / "longbench", datasets, n=2)
    return tmp


def script(tmp: Path, hub: Path, data: Path, *args: str, max_length: int = 256) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "DS_STUDY_CACHE": str(tmp / "ds_cache")}
    env.pop("HF_HUB_OFFLINE", None)  # the script sets it itself
    return subprocess.run([sys.executable, "scripts/paper_study.py", *args, "--data", str(data), "--device", "cpu",
                           "--dtype", "float32", "--max-length", str(max_length), "workers=1", "threads=1",
                           f"results_root={tmp / 'runs'}", f"cells_root={tmp / 'cells'}", "cells_seed=null"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def check_results(runs: Path, names: list[str], stdout: str) -> None:
    """Every result file of the study and of the profile of each pair, made from the cached checkpoints."""
    runs = sorted(runs.iterdir())
    for name in names:
        mp = pair_yaml(name)
        st = next(r for r in runs if f"_study_{name}_" in r.name)
        pr = next(r for r in runs if f"_profile_{name}_" in r.name)
        out = st / "study" / name
        for d in mp.datasets:
            assert (out / d / "quality.json").is_file(), d
        for f in ("sensitivity.json", "sensitivity.csv", "propagation.csv", "deviation.csv"):
            assert (out / mp.task / f).is_file(), f
        transfer = json.loads((out / "transfer.json").read_text())
        assert transfer["datasets"] == list(mp.datasets) and transfer["n_layers"] == 4
        summary = json.loads((st / "summary.json").read_text())
        assert summary["models"]["receiver"]["name"] == mp.receiver  # the Hub id, read from the cache
        assert summary["models"]["sender"]["name"] == mp.sender
        for f in ("search.json", "frontier_g2.csv", "greedy.csv", "deviation.csv", "samples.jsonl"):
            assert (pr / f).is_file(), f
        cfg = OmegaConf.load(pr / "config.yaml")
        assert cfg.search.method == "both" and cfg.search.granularity == [2] and cfg.search.sensitivity
        assert f"$ python -m ds_study.study model_pair={name}" in stdout


def test_script_runs_the_study_and_the_profile_from_the_local_cache(setup):
    proc = script(setup, setup / "hub", setup / "longbench", *RUN, "--limit", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_results(setup / "runs", RUN, proc.stdout)


@pytest.mark.slow
def test_script_runs_every_paper_pair(setup, tmp_path):
    proc = script(tmp_path, setup / "hub", setup / "longbench", "all", "--limit", "2", max_length=640)  # multi_news: 512 new
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_results(tmp_path / "runs", PAPER, proc.stdout)


def test_a_pair_missing_from_the_cache_is_refused_in_one_line_before_any_work(setup, tmp_path):
    hub = tmp_path / "hub"
    shutil.copytree(setup / "hub", hub)
    shutil.rmtree(snapshot(hub, pair_yaml("paper_mistrallite").receiver).parents[1])  # never downloaded
    (snapshot(hub, pair_yaml("paper_toolace").sender) / "model.safetensors").unlink()  # download cut short
    proc = script(tmp_path, hub, setup / "longbench", "all")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 3 and errors[-1].startswith("refused 2 of 5 pairs before any work"), proc.stderr
    assert errors[0].startswith("error   paper_mistrallite: model_pair.receiver=amazon/MistralLite: no such directory")
    assert errors[1].startswith("error   paper_toolace: model_pair.sender=Team-ACE/ToolACE-2-8B: the local cache "
                                "holds its config but not its weights")
    assert "Traceback" not in proc.stderr
    assert [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("ok")] == \
        ["paper_llama31_70b", "paper_llama3_70b", "paper_mixtral"]  # the stand-ins pass the contract
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cells").exists()


def test_instruct_and_base_tokenizers_differ_in_eos_only_and_are_compatible():
    """Llama-3's instruct tokenizer ends text with <|eot_id|>, its base's with <|end_of_text|>: same
    vocabulary, same BOS, same tokens for any text. The contract accepts the pair (decoding stops at
    either EOS); a different BOS is still refused."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from paper_cache import LLAMA3_SPECIAL, bpe, tokenizer, training_texts

    from ds_study.pair import IncompatiblePair, ModelPair, check_compatible

    text = bpe("llama3", training_texts()[:5])
    instruct, base = tokenizer("llama3", "<|eot_id|>", text), tokenizer("llama3", "<|end_of_text|>", text)
    assert instruct.eos_token_id != base.eos_token_id and instruct.pad_token_id is None
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=1)
    check_compatible(cfg, cfg, instruct, base)
    other_bos = tokenizer("llama3", "<|end_of_text|>", text)
    other_bos.bos_token = LLAMA3_SPECIAL[2]
    with pytest.raises(IncompatiblePair, match="bos_token_id"):
        check_compatible(cfg, cfg, instruct, other_bos)
    pair = ModelPair(None, None, instruct, {}, {}, eos_ids=(instruct.eos_token_id, base.eos_token_id))
    assert pair.stop_ids == {instruct.eos_token_id, base.eos_token_id}
    assert pair.pad_id == instruct.eos_token_id  # no pad token: padding (masked out) uses EOS
    plain = ModelPair(None, None, SimpleNamespace(eos_token_id=2, pad_token_id=0), {}, {})
    assert plain.stop_ids == {2} and plain.pad_id == 0


def test_dataset_dir_serves_every_longbench_dataset(tmp_path, compose_cfg):
    write_longbench_dir(tmp_path, ["hotpotqa"], n=3)
    cfg = compose_cfg("profile", "dataset=hotpotqa", f"dataset_dir={tmp_path}", "limit=null")
    recs = runner.records_of(cfg, runner.task_of(cfg))
    assert len(recs) == 3 and all(r["dataset"] == "hotpotqa" for r in recs)  # the profile split: first 50
    cfg = compose_cfg("profile", "dataset=2wikimqa", f"dataset_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"no 2wikimqa\.jsonl; unzip LongBench's data\.zip"):
        runner.records_of(cfg, runner.task_of(cfg))
