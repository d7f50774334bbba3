"""Architecture adapters: where a Hugging Face decoder keeps its parts, in one place per layout.

The executor, the batched evaluator, the deviation profile and the serving engine drive a model's
own modules -- token embedding, decoder layers, rotary table, final norm, vocabulary head -- and
never re-implement attention. Which attribute holds each part is model-layout knowledge; it lives
here, in the manner of LMCache's per-model compute adapters, and nowhere else.

To support a new ``model_type``: if it keeps its parts where Llama does (``model.model.layers``,
``.rotary_emb``, ``.norm``, ``lm_head``, layers calling ``cache.update`` from ``self_attn``), add
one line to ``ARCHITECTURES``; otherwise subclass ``DecoderLayout`` and register the subclass.
Every architecture must pass tests/test_executor.py's exactness tests (partial prefill with every
layer recomputed equals the model's own forward).
"""

from __future__ import annotations

import weakref


class UnsupportedArchitecture(ValueError):
    """The model's layout is not one the partial-prefill executor can drive."""


class DecoderLayout:
    """The parts of a decoder-only causal LM, as the executor calls them. The interface first; this
    base class implements the Llama layout (``model.model.{embed_tokens, layers, rotary_emb, norm}``,
    ``model.lm_head``), shared by Mistral, Qwen2, Mixtral and Phi-3."""

    def __init__(self, model):
        self.model = model

    def embed(self, ids):
        """Token embeddings of ids [B, T]: the residual stream entering layer 0."""
        return self.model.model.embed_tokens(ids)

    def layer(self, i: int):
        """Decoder layer ``i``; called as layer(hidden, attention_mask=, position_embeddings=,
        position_ids=, cache=, use_cache=True) and writing its K/V through ``cache.update``."""
        return self.model.model.layers[i]

    def attention(self, i: int):
        """Layer ``i``'s attention module (called on its own by the deviation profile)."""
        return self.layer(i).self_attn

    def attention_norm(self, i: int):
        """The norm layer ``i`` applies to its input before attention."""
        return self.layer(i).input_layernorm

    def rotary(self, hidden, position_ids) -> tuple:
        """Rotary (cos, sin) of ``position_ids``, in ``hidden``'s dtype and device."""
        return self.model.model.rotary_emb(hidden, position_ids=position_ids)

    def norm(self, hidden):
        """The final norm after the last layer."""
        return self.model.model.norm(hidden)

    def head_module(self):
        """The vocabulary projection module (the engine times its first call)."""
        return self.model.lm_head

    def head(self, hidden):
        """Vocabulary logits of final-norm hidden states."""
        return self.head_module()(hidden)

    def body(self, **kwargs):
        """The decoder stack's own forward (embedding, every layer, final norm; no head)."""
        return self.model.model(**kwargs)

    def layers(self) -> list:
        return list(self.model.model.layers)

    @classmethod
    def matches(cls, model) -> bool:
        """Whether ``model`` has this layout's parts (a model_type can be registered and still differ)."""
        inner = getattr(model, "model", None)
        return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "rotary_emb", "norm")) and hasattr(model, "lm_head")


# model_type -> layout; the executor runs exactly these (tests/test_executor.py covers each)
ARCHITECTURES: dict[str, type[DecoderLayout]] = {
    "llama": DecoderLayout,
    "mistral": DecoderLayout,
    "qwen2": DecoderLayout,
    "mixtral": DecoderLayout,
    "phi3": DecoderLayout,
}


def register_architecture(model_type: str, layout: type[DecoderLayout] = DecoderLayout) -> None:
    ARCHITECTURES[model_type] = layout


def supported_model_types() -> tuple[str, ...]:
    return tuple(ARCHITECTURES)


def check_model_type(model_type: str, who: str = "model") -> None:
    """Refuse a model_type no layout is registered for (before any weights are loaded)."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{who}: model_type {model_type!r} is not supported by the partial-prefill executor; supported: "
            f"{', '.join(ARCHITECTURES)} (to add one, see ds_study/arch.py)")


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layout(model) -> DecoderLayout:
    """The model's layout adapter, made once per model object."""
    try:
        return _LAYOUTS[model]
    except KeyError:
        pass
    mt = model.config.model_type
    check_model_type(mt)
    cls = ARCHITECTURES[mt]
    if not cls.matches(model):
        raise UnsupportedArchitecture(f"model_type {mt!r}: this model lacks the parts {cls.__name__} drives "
                                      f"(embedding, layers, rotary table, norm, head); register a layout for it")
    _LAYOUTS[model] = out = cls(model)
    return out
