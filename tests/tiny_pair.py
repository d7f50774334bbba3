"""A tiny random Llama pair (receiver, sender) with a small BPE tokenizer, saved like real checkpoints,
and a helper to compose the project's Hydra configs. Shared by the pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ds_study import runner
from ds_study.data import load_records


def build_tiny_pair(root: Path, n_layers: int = 4) -> tuple[Path, Path]:
    """Receiver and sender directories: same tokenizer and shapes; the sender is the receiver plus noise,
    as a fine-tune of a shared base would be."""
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM

    from ds_study.zoo import model_config, train_tokenizer

    texts = [r["context"] + r["input"] + " ".join(r["answers"]) for t in ("pyqa", "pysum", "pycode")
             for r in load_records(t, "profile")[:10]]
    cfg = OmegaConf.create({"tokenizer": {"vocab_size": 400},
                            "model": {"hidden_size": 32, "num_hidden_layers": n_layers, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "intermediate_size": 64,
                                      "max_position_embeddings": 512}})
    tok = train_tokenizer(cfg, texts)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(cfg, tok)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharpen random logits so greedy decoding is not a coin toss
    paths = []
    for name, noise in (("receiver", 0.0), ("sender", 0.02)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def write_dataset(path: Path, n: int = 3) -> Path:
    """A local LongBench-schema JSONL (records of the embedded pyqa task)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in load_records("pyqa", "profile")[:n]))
    return path


# The tests run on the 2M fixture (pair `tiny`) with the full profile's search settings, unless a
# test says otherwise: the shipped default is a reduced profile of a smol pair (ds_study/conf/profile.yaml).
# Committed cells (cells_seed) are never read by tests: each computes what it checks.
FIXTURE_DEFAULTS = {"profile": {"model_pair": "tiny", "limit": "null", "search.granularity": "[2]",
                                "search.sensitivity": "true", "cells_seed": "null"},
                    "profile_full": {"model_pair": "tiny", "cells_seed": "null"},
                    "evaluate": {"model_pair": "tiny", "cells_seed": "null"},
                    "study": {"model_pair": "tiny", "cells_seed": "null"}}


def with_fixture_defaults(config_name: str, overrides: list[str]) -> list[str]:
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [f"{k}={v}" for k, v in FIXTURE_DEFAULTS.get(config_name, {}).items() if k not in given] + list(overrides)


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(runner.CONF_DIR), version_base="1.3"):
        return hcompose(config_name=config_name, overrides=with_fixture_defaults(config_name, overrides))


def pair_overrides(receiver: Path, sender: Path, tmp: Path) -> list[str]:
    return [f"model_pair.receiver={receiver}", f"model_pair.sender={sender}", "model_pair.name=tinytest", "model_pair.task=pyqa",
            "max_length=256", f"results_root={tmp / 'runs'}", f"cells_root={tmp / 'cells'}"]


def fixture_examples(limit: int, task_name: str = "pycode"):
    """The committed 2M fixture pair (zoo:code <- zoo:qa), one thread, and its first ``limit`` profiling
    examples of ``task_name``: (pair, task, examples)."""
    from ds_study import data
    from ds_study.pair import load_pair

    torch.set_num_threads(1)
    pair = load_pair("zoo:code", "zoo:qa")
    task = data.TASKS[task_name]
    return pair, task, runner.prepare(pair, task, data.load_records(task_name, "profile", limit=limit), 1024)
