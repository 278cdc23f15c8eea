"""Hugging Face transformers: ``attn_implementation="memattn"``.

Importing this module registers memattn with transformers (``register()`` does it again,
idempotently):

- the attention function, with ``AttentionInterface.register("memattn", ...)``;
- the mask builder, with ``AttentionMaskInterface.register("memattn", memattn_mask)``, which is
  transformers' ``sdpa_mask``. Without it transformers passes no mask at all to an unknown
  implementation, and causal masking and padding would be silently lost. ``sdpa_mask`` gives a
  4-D bool mask, True = attend (memattn's convention), or None when ``is_causal`` says it all.
  One refinement: a bidirectional mask with padding (encoders, cross-attention), which depends
  on the key only, is returned as the same values broadcast along the queries (a stride-0 view
  of ``[B, 1, 1, Lk]``) instead of a materialised ``[B, 1, Lq, Lk]``, so the function below
  recognises it without reading it and passes it to memattn as a ``key_padding_mask``.

Then::

    import memattn.integrations.hf  # noqa: F401

    model = AutoModel.from_config(config, attn_implementation="memattn")
    # or, for a model already built: memattn.optimize(model)  (switches it and can restore)

What the function does with the arguments transformers passes:

- q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``: GQA/MQA run without repeating k and v;
- a bool mask that only depends on the key (padding: ``[B, 1, 1, Lk]`` or broadcast along the
  queries) becomes memattn's ``key_padding_mask`` (read per key block); any other bool mask is
  passed as it is, a float mask is added;
- ``is_causal`` as SDPA's integration decides it: causal (top-left) only when there is no mask
  and more than one query;
- ``position_bias`` (T5's learned relative position bias) becomes a float mask added to the
  scores, gradient included; combined with padding it stays a broadcast ``[1, H, Lq, Lk]`` bias
  plus a ``key_padding_mask`` (only a full bool mask forces one combined float mask);
- ``dropout`` and ``scaling`` as given; ``output_attentions=True`` returns the weights,
  computed block-wise from memattn's log-sum-exp.

Limits: models whose attention does not go through ``AttentionInterface`` (transformers'
``_can_set_attn_implementation()`` is False for them, e.g. DeBERTa-v2, Bloom, Falcon in
transformers 5.x) accept ``attn_implementation="memattn"`` but never call it: ``check(model)``
says so, ``memattn.optimize`` leaves them alone with that reason and ``memattn.status`` shows
their attention as not running memattn. ``softcap``, attention sinks and paged caches are not
supported (``ValueError`` / ``NotImplementedError``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from memattn import nn as mnn
from memattn.functional import attention

__all__ = [
    "NAME",
    "check",
    "disable",
    "enable",
    "is_hf_model",
    "memattn_attention_forward",
    "memattn_mask",
    "memattn_via",
    "register",
]

NAME = "memattn"


def _is_key_only(mask: Tensor) -> bool:
    """True when a 4-D bool mask depends on (batch, key) only: the same for every head and
    query, i.e. a padding mask."""
    return (mask.shape[1] == 1 or mask.stride(1) == 0) and (
        mask.shape[2] == 1 or mask.stride(2) == 0
    )


def memattn_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function signature; returns ``(out [B, Lq, Hq, Dv], weights or
    None)``. See the module docstring for how each argument is used."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "softcap: memattn attention does not support logit soft-capping; use "
            "attn_implementation='eager' for this model"
        )
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{name}: memattn attention does not support attention sinks")
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        raise NotImplementedError("cache: memattn attention does not support paged caches")

    B, Lq = query.shape[0], query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # SDPA's rule in transformers: causal only without a mask, and never for a single query
    # (decoding attends to the whole cache). top_left equals SDPA's cropping of an empty
    # static cache's tail.
    causal = bool(Lq > 1 and attention_mask is None and is_causal)

    attn_mask = None
    key_padding_mask = None
    if attention_mask is not None:
        if (
            attention_mask.dtype == torch.bool
            and attention_mask.dim() == 4
            and _is_key_only(attention_mask)
        ):
            key_padding_mask = (~attention_mask[:, 0, 0, :]).expand(B, -1).contiguous()
        else:
            attn_mask = attention_mask
    if position_bias is not None:
        if attn_mask is None:
            attn_mask = position_bias
        elif attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, position_bias, -math.inf)
        else:
            attn_mask = position_bias + attn_mask
    if (
        attn_mask is not None
        and attn_mask.is_floating_point()
        and attn_mask.dtype not in (query.dtype, torch.float32)
    ):
        attn_mask = attn_mask.to(query.dtype)
    dropout_p = float(dropout)
    # A mask with a Lk wider than the keys (some models pad it) is cut to the keys.
    if attn_mask is not None and attn_mask.shape[-1] != key.shape[2]:
        attn_mask = attn_mask[..., : key.shape[2]]

    call = {
        "attn_mask": attn_mask,
        "key_padding_mask": key_padding_mask,
        "is_causal": causal,
        "dropout_p": dropout_p,
        "scale": scaling,
    }
    tracer = mnn._tracer()
    if tracer is not None:
        tracer.record_memattn(
            module, query, key, value, call, note="transformers AttentionInterface"
        )
    output_attentions = bool(kwargs.get("output_attentions", False))
    if output_attentions:
        out, lse = attention(query, key, value, **call, return_lse=True)
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (query, key, attn_mask)
        )
        weights = mnn.attention_weights(
            query,
            key,
            lse,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=causal,
            scale=scaling,
            differentiable=differentiable,
        )
    else:
        out = attention(query, key, value, **call)
        weights = None
    return out.transpose(1, 2).contiguous(), weights


def memattn_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """transformers' ``sdpa_mask``; a padding-only bidirectional mask comes back as a broadcast
    view (same values, see the module docstring)."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    names = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    if (
        bound.get("mask_function") is bidirectional_mask_function
        and not bound.get("use_vmap", False)
        and bound.get("q_length", 0) > 1
    ):
        q_length = bound["q_length"]
        mask = sdpa_mask(**{**bound, "q_length": 1})
        return None if mask is None else mask.expand(-1, -1, q_length, -1)
    return sdpa_mask(*args, **kwargs)


_registered = False


def register() -> None:
    """Registers "memattn" with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, memattn_attention_forward)
    AttentionMaskInterface.register(NAME, memattn_mask)
    _registered = True


def is_hf_model(model: torch.nn.Module) -> bool:
    """Is ``model`` a transformers ``PreTrainedModel``?"""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _uses_interface(model) -> bool:
    can = getattr(type(model), "_can_set_attn_implementation", None)
    return bool(can()) if can is not None else False


def check(model: torch.nn.Module) -> str | None:
    """None if ``model`` can run memattn through ``attn_implementation``, else why not."""
    if not is_hf_model(model):
        return "not a transformers PreTrainedModel"
    if not _uses_interface(model):
        return (
            f"{type(model).__name__}'s attention does not go through transformers' "
            "AttentionInterface, so attn_implementation='memattn' would be ignored; it needs a "
            "module adapter (memattn.convert.register_adapter)"
        )
    from memattn.convert import backend_reason

    params = [p for p in model.parameters() if p.is_floating_point()]
    if params:
        config = model.config
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        head_dim = getattr(config, "head_dim", None) or (
            hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else 64
        )
        return backend_reason(params[0].device, params[0].dtype, int(head_dim))
    return None


def enable(model: torch.nn.Module) -> str:
    """Switches ``model`` to ``attn_implementation="memattn"``; returns the previous one (for
    ``disable``). Raises ValueError when ``check(model)`` gives a reason."""
    why = check(model)
    if why:
        raise ValueError(why)
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise RuntimeError(
            f"set_attn_implementation('{NAME}') left {type(model).__name__} on "
            f"{model.config._attn_implementation!r}"
        )
    return previous


def disable(model: torch.nn.Module, previous: str) -> None:
    """Switches ``model`` back to ``previous`` (as returned by ``enable``)."""
    model.set_attn_implementation(previous)


def memattn_via(module: torch.nn.Module) -> str:
    """For ``memattn.status``: how a PreTrainedModel runs memattn ("" if it does not)."""
    if not is_hf_model(module):
        return ""
    if getattr(module.config, "_attn_implementation", None) != NAME:
        return ""
    return "transformers attn_implementation='memattn'" if _uses_interface(module) else ""


register()
