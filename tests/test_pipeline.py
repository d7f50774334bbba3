"""The embedded family, the pair contract and the profile/evaluate pipelines, end to end on CPU."""

import json
import shutil

import pandas as pd
import pytest
import torch

from ds_study import evaluate, profile, runner
from ds_study.pair import IncompatiblePair, load_pair
from ds_study.zoo import ZOO_DIR, ZooError, verify, variant_path


def test_committed_family_verifies_and_loads_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = verify()
    assert set(manifest["variants"]) == {"qa", "code"}  # the fixture: pair tiny only
    assert set(manifest["not_committed"]["variants"]) == {"base", "sum"}  # recorded, checked by a rebuild
    with pytest.raises(ZooError, match="not committed"):
        variant_path("sum")
    model = AutoModelForCausalLM.from_pretrained(variant_path("qa"))
    tok = AutoTokenizer.from_pretrained(variant_path("qa"))
    c = model.config
    assert c.model_type == "llama" and c.num_hidden_layers >= 8
    assert c.num_key_value_heads < c.num_attention_heads  # GQA: E is larger than one layer's KV
    head_dim = c.hidden_size // c.num_attention_heads
    assert c.hidden_size > 2 * c.num_key_value_heads * head_dim - 1
    assert tok("def f(x):")["input_ids"][0] == tok.bos_token_id


def test_fixture_variants_differ_in_every_layer():
    from safetensors.torch import load_file

    qa = load_file(str(variant_path("qa") / "model.safetensors"))
    code = load_file(str(variant_path("code") / "model.safetensors"))
    for i in range(8):
        assert not torch.equal(qa[f"model.layers.{i}.self_attn.k_proj.weight"], code[f"model.layers.{i}.self_attn.k_proj.weight"])


def test_corrupt_zoo_file_says_how_to_rebuild(tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(ZOO_DIR, copy)
    weights = copy / "code" / "model.safetensors"
    good = weights.read_bytes()
    raw = bytearray(good)
    raw[-10] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(ZooError, match="corrupt.*rebuild"):
        verify(copy)
    weights.write_bytes(good)
    (copy / "qa" / "config.json").unlink()
    with pytest.raises(ZooError, match="missing"):
        verify(copy)


def test_unknown_pair_and_dataset_list_the_choices(compose_cfg):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="tiny"):
        compose_cfg("profile", "model_pair=nope")
    with pytest.raises(ValueError, match="available: .*pyqa"):
        runner.validate(compose_cfg("profile", "dataset=nope"))


def test_tokenizer_mismatch_refused_before_any_weights_load(tmp_path, monkeypatch):
    import transformers

    other = tmp_path / "other"
    shutil.copytree(variant_path("code"), other)
    vocab_file = other / "tokenizer.json"
    tj = json.loads(vocab_file.read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[300], list(vocab)[301]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    vocab_file.write_text(json.dumps(tj))

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the compatibility check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(IncompatiblePair, match="tokenizers"):
        load_pair("zoo:qa", str(other))


def test_shape_mismatch_refused(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(variant_path("code"), other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatiblePair, match="num_key_value_heads"):
        load_pair("zoo:qa", str(other))


def test_profile_writes_results_and_never_overwrites(compose_cfg, tmp_path):
    cfg = compose_cfg("profile", "limit=2", f"results_root={tmp_path}/runs", f"cells_root={tmp_path}/cells",
                      "search.enabled=false")  # the search has its own tests (test_search.py)
    first = profile.main(cfg)
    second = profile.main(cfg)
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    run = runs[0]
    for f in ("config.yaml", "env.json", "samples.jsonl", "summary.json", "deviation.csv",
              "deviation_per_example.csv", "deviation.png"):
        assert (run / f).exists(), f
    dev = pd.read_csv(run / "deviation.csv")
    assert {"layer", "k_dev", "v_dev", "e_dev", "attn_cos", "k_dev_p25", "k_dev_p75", "attn_cos_std"} <= set(dev.columns)
    assert len(dev) == 8 and (dev.k_dev > 0).all()
    assert [r["plan"] for r in first["quality"]] == ["full_prefill", "sender", "full_reuse"]
    assert first["quality"] == second["quality"]  # second run served from the cell file
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] and env["transformers"] and "git_commit" in env
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"id", "plan", "prediction", "score"} <= set(samples[0])


def test_self_deviation_is_exactly_zero(compose_cfg, tmp_path):
    cfg = compose_cfg("profile", "limit=1", "model_pair.receiver=zoo:qa", "model_pair.sender=zoo:qa", "plans=[full_reuse]",
                      f"results_root={tmp_path}/runs", f"cells_root={tmp_path}/cells", "search.enabled=false")
    summary = profile.main(cfg)
    dev = pd.read_csv(next((tmp_path / "runs").iterdir()) / "deviation.csv")
    assert (dev[["k_dev", "v_dev", "e_dev"]] == 0.0).all().all()
    assert (dev[["k_cos", "v_cos", "e_cos", "attn_cos"]] - 1.0).abs().max().max() < 1e-9
    full = summary["quality"][0]
    assert full["plan"] == "full_reuse"


def test_evaluate_scores_named_and_group_plans(compose_cfg, tmp_path):
    cfg = compose_cfg("evaluate", "limit=2", "plan=[full_prefill,full_reuse,cacheblend,'2-5',[[0,1],[6,7]]]",
                      f"results_root={tmp_path}/runs", f"cells_root={tmp_path}/cells")
    summary = evaluate.main(cfg)
    assert [r["plan"] for r in summary["quality"]] == ["full_prefill", "full_reuse", "cacheblend@0.15",
                                                        "groups:2-5", "groups:0-1,6-7"]
    with pytest.raises(Exception, match="outside layers"):
        evaluate.main(compose_cfg("evaluate", "plan='6-9'", f"results_root={tmp_path}/r2"))
    assert not (tmp_path / "r2").exists()  # refused before any run directory or model load


@pytest.mark.parametrize("override, message", [
    ("search.method=foo", "search.method must be exhaustive, greedy or both"),
    ("search.granularity=[0]", "search.granularity must be an integer in"),
    ("search.granularity=[9]", "search.granularity must be an integer in"),
    ("search.deltas=[-0.1]", "search.deltas must be"),
    ("search.deltas=[1.5]", "search.deltas must be"),
    ("search.delta_mode=percent", "search.delta_mode must be relative or absolute"),
    ("search.prior=cos", "search.prior must be"),
    ("search.greedy_width=3", "search.greedy_width must be"),
    ("search.max_fraction=0", "search.max_fraction must be in"),
    ("search.holdout_split=nope", "search.holdout_split must be null, profile or test"),
    ("search.holdout_split=profile", "search.holdout_split must be the split not being profiled"),
    ("search.publish=maybe", "search.publish must be true or false"),
    ("search.out_root=/tmp/elsewhere", "search.out_root is where search.publish=true writes"),
])
def test_bad_search_settings_refused_before_any_model_loads(refused_before_weights, override, message):
    refused_before_weights(profile.main, "profile", override, message)


def test_lora_variant_does_not_depend_on_earlier_rng_draws(tmp_path):
    """A variant built right after pretraining (which draws from the global RNG) equals one built
    on a reused base: LoRA's initialisation must not inherit the RNG state of earlier work."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from ds_study import zoo
    from ds_study.manifests import sha256_file
    from tiny_pair import build_tiny_pair

    receiver, _ = build_tiny_pair(tmp_path / "pair")
    cfg = OmegaConf.load(zoo.CONF_DIR / "zoo.yaml")
    cfg.variants = {"sum": {**OmegaConf.to_container(cfg.variants.sum), "steps": 2, "batch_size": 2, "lora_r": 4}}
    cfg.finetune_max_length, cfg.finetune_val_examples, cfg.finetune_pack, cfg.threads = 256, 2, 1, 1
    digests = []
    for draws in (0, 1000):
        out = tmp_path / f"build{draws}"
        shutil.copytree(receiver, out / "base")
        torch.manual_seed(123)
        torch.rand(draws)
        zoo.build_variant(cfg, "sum", out, AutoTokenizer.from_pretrained(out / "base"))
        digests.append(sha256_file(out / "sum" / "model.safetensors"))
    assert digests[0] == digests[1]


def test_copy_phase_rows_are_repeats_and_phase_is_off_by_default():
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_study import zoo

    pool = torch.arange(100, 140)
    rows = zoo.repeated_segments(pool, 6, 64, torch.Generator().manual_seed(0))
    assert rows.shape == (6, 64) and bool(torch.isin(rows, pool).all())
    for row in rows:  # periodic: some period m <= 32 reproduces the row from its first m tokens
        assert any(torch.equal(row[m:], row[:-m]) for m in range(8, 33))
    cfg = OmegaConf.load(zoo.CONF_DIR / "zoo.yaml")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64))
    train = torch.randint(0, 200, (5000,), generator=torch.Generator().manual_seed(0))
    before = [p.clone() for p in model.parameters()]
    assert zoo.copy_phase(cfg, model, train, "cpu") == {}  # committed recipe: no copy phase
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    cfg.pretrain.copy_phase.steps, cfg.pretrain.copy_phase.batch_size = 3, 2
    stats = zoo.copy_phase(cfg, model, train, "cpu")
    assert stats["copy_phase_tokens"] == 3 * 2 * 64 and stats["copy_phase_final_loss"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_zoo_build_never_deletes_a_folder_that_is_not_a_model_family(tmp_path):
    import json as _json

    from ds_study.zoo import MANIFEST, ZooError, check_build_dir

    check_build_dir(tmp_path / "new")  # absent or empty: fine
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("x")
    with pytest.raises(ZooError, match="thesis.tex"):
        check_build_dir(notes)
    family = tmp_path / "family"
    (family / "base").mkdir(parents=True)
    (family / MANIFEST).write_text(_json.dumps({"variants": {"base": {}, "qa": {}}}))
    check_build_dir(family)  # an earlier build: replaced
    (family / "results.csv").write_text("x")
    with pytest.raises(ZooError, match="results.csv"):
        check_build_dir(family)
