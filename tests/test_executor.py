"""Invariants of the partial-prefill executor on small random models of every supported architecture."""

import pytest
import torch

from ds_study.caches import CacheChecksumError, ContextCache, analytic_bytes_per_token
from ds_study.executor import capture, decode, partial_prefill, run_plan, suffix_pass
from ds_study.plans import PlanError, parse_plan
from ds_study.arch import UnsupportedArchitecture

torch.manual_seed(0)
ARCHS = ("llama", "mistral", "qwen2", "mixtral", "phi3", "mistral_sw8", "qwen2_sw8", "phi3_sw8")


def tiny_model(arch: str, seed: int = 0):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=256, attn_implementation="sdpa")
    cfg = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        # windows shorter than the test contexts (40 tokens): sliding layers only, and mixed with full ones
        "mistral_sw8": lambda: tf.MistralConfig(**common, sliding_window=8),
        "qwen2_sw8": lambda: tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=2),
        # Phi-3.5-mini: multi-head attention (as many KV heads as query heads), fused qkv; its config
        # carries a sliding window (262144), so every layer runs the sliding-window path
        "phi3": lambda: tf.Phi3Config(**{**common, "num_key_value_heads": 4}, sliding_window=None, pad_token_id=0),
        "phi3_sw8": lambda: tf.Phi3Config(**{**common, "num_key_value_heads": 4}, sliding_window=8, pad_token_id=0),
    }[arch]()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # Random init gives near-uniform logits; sharpen them so greedy decoding is not a coin toss.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def prompt(n_prefix=40, n_suffix=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n_prefix + n_suffix,), generator=g).tolist()
    return ids[:n_prefix], ids[n_prefix:]


def reference(model, prefix, suffix, new_tokens):
    """The receiver's own one-shot prefill of the whole prompt, through transformers' generate."""
    ids = torch.tensor([prefix + suffix])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                             pad_token_id=0, eos_token_id=None)
    return logits, out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_recompute_everything_equals_full_prefill(arch):
    model = tiny_model(arch)
    prefix, suffix = prompt()
    ref_logits, ref_tokens = reference(model, prefix, suffix, 8)
    plan = parse_plan("full_prefill", 4)
    out = run_plan(model, None, plan, prefix, suffix, 8)
    assert out.token_ids == ref_tokens
    assert torch.allclose(out.first_logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_reuse_everything_from_itself_equals_full_prefill(arch):
    model = tiny_model(arch)
    prefix, suffix = prompt(seed=2)
    ref_logits, ref_tokens = reference(model, prefix, suffix, 8)
    own = capture(model, prefix)
    out = run_plan(model, model, parse_plan("full_reuse", 4), prefix, suffix, 8, sender_cache=own)
    assert out.token_ids == ref_tokens
    assert torch.allclose(out.first_logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_cacheblend_all_tokens_equals_full_prefill(arch):
    receiver, sender = tiny_model(arch, 0), tiny_model(arch, 1)
    prefix, suffix = prompt(seed=3)
    ref_logits, _ = reference(receiver, prefix, suffix, 1)
    sc = capture(sender, prefix)
    out = run_plan(receiver, sender, parse_plan("cacheblend@1.0", 4), prefix, suffix, 1, sender_cache=sc)
    assert torch.allclose(out.first_logits, ref_logits, atol=1e-5, rtol=0)
    partial = run_plan(receiver, sender, parse_plan("cacheblend@0.2", 4), prefix, suffix, 1, sender_cache=sc)
    assert not torch.allclose(partial.first_logits, ref_logits, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_group_starts_from_sender_E_at_its_first_layer(arch):
    receiver, sender = tiny_model(arch, 0), tiny_model(arch, 1)
    prefix, suffix = prompt(seed=4)
    sc = capture(sender, prefix)
    plan = parse_plan("2-3", 4)
    base = run_plan(receiver, sender, plan, prefix, suffix, 1, sender_cache=sc).first_logits

    def perturbed(kind, layer):
        c = ContextCache(list(sc.keys), list(sc.values), list(sc.embeds), sc.model_id, sc.token_ids)
        getattr(c, {"e": "embeds", "k": "keys"}[kind])[layer] = sc.tensor(kind, layer) + 0.5
        return run_plan(receiver, sender, plan, prefix, suffix, 1, sender_cache=c).first_logits

    assert not torch.allclose(perturbed("e", 2), base, atol=1e-4)  # E_2 feeds the group
    assert torch.equal(perturbed("e", 1), base)  # E_1 is never read: layer 1 is reused
    assert torch.equal(perturbed("k", 2), base)  # sender K of a recomputed layer is never read
    assert not torch.allclose(perturbed("k", 1), base, atol=1e-4)  # reused layer's K is read


def test_recomputed_layers_match_receiver_and_reused_match_sender():
    receiver, sender = tiny_model("llama", 0), tiny_model("llama", 1)
    prefix, _ = prompt(seed=5)
    sc, rc = capture(sender, prefix), capture(receiver, prefix)
    layers = partial_prefill(receiver, parse_plan("0-1", 4), prefix, sc)
    assert torch.allclose(layers[0][0], rc.keys[0], atol=1e-6) and torch.allclose(layers[1][1], rc.values[1], atol=1e-6)
    assert layers[2][0] is sc.keys[2] and layers[3][1] is sc.values[3]


def test_capture_E_is_residual_entering_layer():
    model = tiny_model("llama")
    prefix, _ = prompt(seed=6)
    c = capture(model, prefix)
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([prefix]), output_hidden_states=True).hidden_states
    for i in range(4):
        assert torch.allclose(c.embeds[i], hs[i], atol=1e-6)


def test_plan_parsing_and_errors():
    assert parse_plan("2-3,0-1", 8).groups == ((0, 1), (2, 3))
    assert parse_plan([[4, 7]], 8).transition_layers() == [4]
    assert parse_plan("full_prefill", 8).n_recomputed() == 8
    assert parse_plan("full_reuse", 8).reused_layers(8) == list(range(8))
    assert parse_plan("cacheblend@0.3", 8).ratio == 0.3
    with pytest.raises(PlanError, match="outside layers 0..7"):
        parse_plan("6-8", 8)
    with pytest.raises(PlanError, match="starts after it ends; write first-last, e.g. 2-3"):
        parse_plan("3-2", 8)
    with pytest.raises(PlanError, match="overlap"):
        parse_plan("0-3,3-4", 8)
    with pytest.raises(PlanError, match="cannot parse"):
        parse_plan("everything", 8)
    with pytest.raises(PlanError, match="no sender cache"):
        partial_prefill(tiny_model("llama"), parse_plan("0-1", 4), [5, 6, 7], None)


def test_unsupported_architecture_is_refused():
    import transformers as tf

    gpt2 = tf.AutoModelForCausalLM.from_config(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        capture(gpt2, [1, 2, 3])


def test_the_registered_layout_is_what_the_executor_drives(monkeypatch):
    from ds_study import arch

    class Counting(arch.DecoderLayout):
        layers_run = 0

        def layer(self, i):
            Counting.layers_run += 1
            return super().layer(i)

    monkeypatch.setitem(arch.ARCHITECTURES, "llama", Counting)
    model = tiny_model("llama")
    capture(model, prompt()[0])
    assert Counting.layers_run == 4


def test_cache_roundtrip_bytes_and_checksum(tmp_path):
    model = tiny_model("llama")
    prefix, _ = prompt(seed=7)
    c = capture(model, prefix, model_id={"name": "m"})
    path = c.save(tmp_path / "c.safetensors")
    back = ContextCache.load(path)
    assert back.model_id == {"name": "m"} and back.token_ids == prefix
    assert all(torch.equal(a, b) for a, b in zip(back.embeds, c.embeds))
    assert c.bytes_per_token("k") == analytic_bytes_per_token(model.config, 4)["k"]
    assert c.bytes_per_token("e") == analytic_bytes_per_token(model.config, 4)["e"]
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheChecksumError, match="corrupt"):
        ContextCache.load(path)


def test_cache_header_is_covered_by_the_checksum_and_old_files_still_load(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ds_study.caches import tensors_sha256

    c = capture(tiny_model("llama"), prompt(seed=7)[0], model_id={"name": "m"})
    path = c.save(tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    forged = dict(meta, model_id=json.dumps({"name": "other"}))  # same tensors, another model's name
    save_file(tensors, str(tmp_path / "forged.safetensors"), metadata=forged)
    with pytest.raises(CacheChecksumError, match="corrupt"):
        ContextCache.load(tmp_path / "forged.safetensors")
    old = dict(meta, format="ds_study.cache/1", checksum=tensors_sha256(tensors))  # written before the header counted
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=old)
    assert ContextCache.load(tmp_path / "v1.safetensors").model_id == {"name": "m"}


def test_every_plan_kind_checks_the_sender_context_and_says_when_it_needs_a_sender():
    model = tiny_model("llama")
    prefix, suffix = prompt(seed=8)
    other = capture(model, prompt(seed=9)[0])  # same length, another context
    for spec in ("2-3", "cacheblend@0.5", "reuse_only:2"):
        with pytest.raises(PlanError, match="different context"):
            partial_prefill(model, parse_plan(spec, 4), prefix, other)
    needs = {s: parse_plan(s, 4).needs_sender for s in ("full_prefill", "0-3", "full_reuse", "2-3", "0-1,2-3",
                                                        "cacheblend", "reuse_only:2", "sender")}
    assert needs == {"full_prefill": False, "0-3": False, "full_reuse": True, "2-3": True,
                     "0-1,2-3": True,  # all layers recomputed, but [2, 3] starts from the sender's E_2
                     "cacheblend": True, "reuse_only:2": True, "sender": True}


def test_weight_hash_memo_survives_a_torn_file(tmp_path, monkeypatch):
    from ds_study.pair import weights_sha256

    monkeypatch.setenv("DS_STUDY_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x" * 1000)
    first = weights_sha256(ckpt)
    (tmp_path / "cache" / "weight_hashes.json").write_text('{"trunc')  # a writer killed halfway
    assert weights_sha256(ckpt) == first
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_sender_cache_in_another_dtype_is_cast_for_every_plan_kind():
    receiver, sender = tiny_model("llama", 0), tiny_model("llama", 1)
    prefix, suffix = prompt(seed=10)
    sc = capture(sender, prefix)
    wide = ContextCache([k.double() for k in sc.keys], [v.double() for v in sc.values],
                        [e.double() for e in sc.embeds], sc.model_id, sc.token_ids)  # exact copy, float64
    for spec in ("2-3", "cacheblend@0.5", "reuse_only:2"):
        plan = parse_plan(spec, 4)
        want = run_plan(receiver, sender, plan, prefix, suffix, 3, sender_cache=sc)
        got = run_plan(receiver, sender, plan, prefix, suffix, 3, sender_cache=wide)
        assert got.token_ids == want.token_ids and torch.equal(got.first_logits, want.first_logits), spec


def test_decode_stops_at_eos():
    model = tiny_model("llama")
    prefix, suffix = prompt(seed=8)
    layers = partial_prefill(model, parse_plan("full_prefill", 4), prefix, None)
    first = decode(model, layers, suffix, 5).token_ids
    layers = partial_prefill(model, parse_plan("full_prefill", 4), prefix, None)
    assert decode(model, layers, suffix, 5, eos_token_id=first[1]).token_ids == first[:1]


def test_reuse_only_reads_sender_kv_at_that_layer_only():
    receiver, sender = tiny_model("llama", 0), tiny_model("llama", 1)
    prefix, suffix = prompt(seed=9)
    sc, rc = capture(sender, prefix), capture(receiver, prefix)
    plan = parse_plan("reuse_only:2", 4)
    assert plan.name == "reuse_only:2" and plan.recomputed_layers() == [0, 1, 3]
    layers = partial_prefill(receiver, plan, prefix, sc)
    assert torch.allclose(layers[1][0], rc.keys[1], atol=1e-6)  # before the reused layer: receiver's own
    assert layers[2][0] is sc.keys[2]  # the reused layer: sender's
    assert not torch.allclose(layers[3][0], rc.keys[3], atol=1e-4)  # after it: changed by what layer 2 read
    same = partial_prefill(receiver, plan, prefix, rc)  # reusing its own KV changes nothing
    assert all(torch.allclose(a[0], b, atol=1e-5) for a, b in zip(same, rc.keys))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_new", [1, 2, 7])
def test_suffix_pass_is_bitwise_transformers_forward(arch, n_new):
    """The lower-right causal suffix pass (flash-eligible on CUDA) computes exactly what transformers'
    own forward computes after a cache, hidden states and the cache it extends alike."""
    from transformers import DynamicCache

    model = tiny_model(arch)
    prefix, suffix = prompt(n_suffix=n_new)
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model.model(input_ids=torch.tensor([prefix]), cache=c, use_cache=True)
        ids = torch.tensor([suffix])
        want = model.model(input_ids=ids, cache=caches[0], use_cache=True).last_hidden_state
        got = suffix_pass(model, ids, caches[1])
    assert torch.equal(got, want)
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(caches[0].layers, caches[1].layers))


@pytest.mark.parametrize("arch", ARCHS)
def test_suffix_inputs_prepared_before_the_context_arrives_change_nothing(arch):
    """The engine makes the suffix's embeddings, rotary table and causal bias while it still waits for
    the context's K/V; the pass then computes bitwise what it computes unprepared."""
    from transformers import DynamicCache

    from ds_study.executor import lower_right_exact, prepare_suffix

    model = tiny_model(arch)
    prefix, suffix = prompt(n_suffix=5)
    caches = [DynamicCache(config=model.config) for _ in range(3)]
    with torch.no_grad():
        for c in caches:
            model.model(input_ids=torch.tensor([prefix]), cache=c, use_cache=True)
        ids = torch.tensor([suffix])
        prepared = prepare_suffix(model, ids, len(prefix))
        if prepared is None:  # sliding-window layers: transformers' own forward runs the pass
            assert not lower_right_exact(model, len(prefix), len(suffix))
            return
        assert torch.equal(suffix_pass(model, ids, caches[0], prepared), suffix_pass(model, ids, caches[1]))
        with pytest.raises(ValueError, match="prepared after 3 context tokens"):
            suffix_pass(model, ids, caches[2], prepare_suffix(model, ids, 3))


def test_rotary_table_rows_are_the_positions_own_rotary():
    """Streaming recomputation slices one table of every position; each slice must be bitwise what the
    model computes for those positions alone."""
    from ds_study.executor import rotary_table

    model = tiny_model("llama")
    cos, sin = rotary_table(model, 300)
    hidden = torch.zeros(1, 1, model.config.hidden_size)
    for t0, t1 in ((0, 64), (64, 171), (171, 300)):
        c, s = model.model.rotary_emb(hidden, position_ids=torch.arange(t0, t1).view(1, -1))
        assert torch.equal(cos[:, t0:t1], c) and torch.equal(sin[:, t0:t1], s)
