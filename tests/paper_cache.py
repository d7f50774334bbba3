"""Tiny random stand-ins of the paper's pairs (ds_study/conf/model_pair/paper_*.yaml), saved into a local
Hugging Face cache under the real Hub ids, and a tiny LongBench-schema data directory.

Each stand-in keeps what the compatibility contract and the executor see of the real pair: the model
class (Llama, Mixtral, Mistral), the ratio of query to KV heads, the real rope settings (Llama-3.1's
``llama3`` scaling, MistralLite's rope_theta and sliding window against its base's), mixture-of-experts
routing, and the real tokenizers' special tokens: no pad token, and for the Llama-3 pairs an instruct
tokenizer that ends text with ``<|eot_id|>`` where the base one ends it with ``<|end_of_text|>``. Sizes
are scaled down (4 layers, hidden 64, 8 query heads); the receiver and the sender are two random seeds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ds_study import runner
from ds_study.data import TASKS, load_records

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>"]
TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 224}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# pair -> model class, tokenizer family, config fields of both sides, then of the receiver / the sender only
# (KV heads: the real GQA ratio, 64:8 -> 8:1, 32:8 -> 8:2), eos of the receiver's / sender's tokenizer
PAIRS = {
    "paper_llama31_70b": dict(cls="Llama", tok="llama3", eos=("<|eot_id|>", "<|end_of_text|>"),
                              both={"num_key_value_heads": 1, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE,
                                    "max_position_embeddings": 131072}),
    "paper_llama3_70b": dict(cls="Llama", tok="llama3", eos=("<|eot_id|>", "<|end_of_text|>"),
                             both={"num_key_value_heads": 1, "rope_theta": 500000.0, "max_position_embeddings": 8192}),
    "paper_toolace": dict(cls="Llama", tok="llama3", eos=("<|eot_id|>", "<|eot_id|>"),
                          both={"num_key_value_heads": 2, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE,
                                "max_position_embeddings": 131072}),
    "paper_mixtral": dict(cls="Mixtral", tok="mistral", eos=("</s>", "</s>"),
                          both={"num_key_value_heads": 2, "rope_theta": 1e6, "max_position_embeddings": 32768,
                                "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None}),
    "paper_mistrallite": dict(cls="Mistral", tok="mistral", eos=("</s>", "</s>"),
                              both={"num_key_value_heads": 2, "max_position_embeddings": 32768},
                              receiver={"rope_theta": 1e6, "sliding_window": 16384},
                              sender={"rope_theta": 10000.0, "sliding_window": 4096}),
}


def pair_yaml(name: str):
    return OmegaConf.load(runner.CONF_DIR / "model_pair" / f"{name}.yaml")


def training_texts() -> list[str]:
    return [r["context"] + r["input"] + " ".join(r["answers"]) for t in ("pyqa", "pycode")
            for r in load_records(t, "profile")[:10]]


def bpe(family: str, texts: list[str]) -> str:
    """A byte-level BPE (JSON) with the family's special tokens first and BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = LLAMA3_SPECIAL if family == "llama3" else MISTRAL_SPECIAL
    bos = special[0] if family == "llama3" else "<s>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, special.index(bos))])
    return tok.to_str()


def tokenizer(family: str, eos: str, bpe_json: str):
    """The family's tokenizer ending text with ``eos``; like the real ones, no pad token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bos = LLAMA3_SPECIAL[0] if family == "llama3" else "<s>"
    extra = {"unk_token": "<unk>"} if family == "mistral" else {}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe_json), bos_token=bos, eos_token=eos, **extra)


def model(spec: dict, side: str, tok, seed: int):
    import transformers

    fields = {**TINY, **spec["both"], **spec.get(side, {})}
    config = getattr(transformers, f"{spec['cls']}Config")(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        **fields)
    torch.manual_seed(seed)
    m = getattr(transformers, f"{spec['cls']}ForCausalLM")(config).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # sharpen random logits so greedy decoding is not a coin toss
    return m


def snapshot(hub: Path, repo_id: str) -> Path:
    """``hub/models--org--name/snapshots/<rev>/``, with ``refs/main`` naming the revision, as the Hub leaves it."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    rev = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    path = repo / "snapshots" / rev
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_cache(hub: Path, pairs: list[str]) -> dict[str, tuple[Path, Path]]:
    """Save each pair's receiver and sender into ``hub`` (a ``HF_HUB_CACHE``) under the yaml's Hub ids."""
    texts, out, bpes = training_texts(), {}, {}
    for i, name in enumerate(pairs):
        spec, mp = PAIRS[name], pair_yaml(name)
        if spec["tok"] not in bpes:
            bpes[spec["tok"]] = bpe(spec["tok"], texts)
        dirs = []
        for side, ref, eos, seed in (("receiver", mp.receiver, spec["eos"][0], 2 * i),
                                     ("sender", mp.sender, spec["eos"][1], 2 * i + 1)):
            tok = tokenizer(spec["tok"], eos, bpes[spec["tok"]])  # one vocabulary for both
            path = snapshot(hub, ref)
            model(spec, side, tok, seed).save_pretrained(path, safe_serialization=True)
            tok.save_pretrained(path)
            dirs.append(path)
        out[name] = tuple(dirs)
    return out


def write_longbench_dir(root: Path, datasets, n: int = 2) -> Path:
    """``root/<dataset>.jsonl`` in LongBench's schema (embedded pyqa records for QA and summaries, pycode
    for code), as LongBench's data.zip unzips."""
    root.mkdir(parents=True, exist_ok=True)
    for d in datasets:
        src = "pycode" if TASKS[d].family == "code" else "pyqa"
        rows = [{**r, "dataset": d} for r in load_records(src, "profile")[:n]]
        (root / f"{d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
