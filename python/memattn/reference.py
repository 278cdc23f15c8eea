"""The ground truth: attention written as plain math, in float64 on CPU.

``attention_reference`` follows DESIGN.md §2 line by line with explicit tensors (it does
materialise the ``Lq x Lk`` scores, so keep it to test sizes). Tests compare memattn's output
and gradients (autograd through this function) against it, and the benchmark uses it as a
correctness check. It deliberately shares no code with the kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_reference"]


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    dropout_p: float = 0.0,
    scale: float | None = None,
    dropout_mask: Tensor | None = None,
    return_lse: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention by the definition, computed in ``dtype`` (float64 by default) on CPU.

    Arguments are those of ``memattn.attention`` (q ``[B, Hq, Lq, D]``, k ``[B, Hk, Lk, D]``,
    v ``[B, Hk, Lk, Dv]``; bool attn_mask True = attend, float attn_mask added; bool
    key_padding_mask ``[B, Lk]`` True = padding; causal ``top_left`` / ``bottom_right``), with:

    - ``dropout_mask``: bool, broadcastable to ``[B, Hq, Lq, Lk]``, True = keep. Required when
      ``dropout_p > 0`` (the reference draws no random numbers); kept probabilities are scaled
      by ``1 / (1 - dropout_p)``.
    - ``dtype``: the precision of every step. float64 is the ground truth; the test dtype
      (e.g. bfloat16) measures how far plain math in that dtype lands, which sets the
      tolerance for memattn in that dtype (DESIGN.md §4).

    Returns ``out`` ``[B, Hq, Lq, Dv]`` (and ``lse`` ``[B, Hq, Lq]`` with ``return_lse``), both
    in ``dtype`` on CPU. Differentiable in q, k, v and a float attn_mask. Fully masked rows
    give out 0, lse -inf and zero gradients.
    """
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(
            f"causal_alignment: expected 'top_left' or 'bottom_right', got {causal_alignment!r}"
        )
    if dropout_p > 0.0 and dropout_mask is None:
        raise ValueError(
            "dropout_mask: required when dropout_p > 0 (the reference is deterministic)"
        )

    qc, kc, vc = (t.to(device="cpu", dtype=dtype) for t in (q, k, v))
    B, Hq, Lq, D = qc.shape
    Hk, Lk = kc.shape[1], kc.shape[2]
    if Hq % Hk != 0:
        raise ValueError(f"k: Hq = {Hq} must be a multiple of Hk = {Hk}")
    group = Hq // Hk
    # GQA / MQA: query head h reads key/value head h // group.
    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    # scores: [B, Hq, Lq, Lk]
    scores = torch.matmul(qc, kc.transpose(-2, -1)) * scale
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if is_causal:
        offset = 0 if causal_alignment == "top_left" else Lk - Lq
        i = torch.arange(Lq).unsqueeze(1)
        j = torch.arange(Lk).unsqueeze(0)
        allowed = allowed & (j <= i + offset)
    allowed = allowed.expand(B, Hq, Lq, Lk)
    if attn_mask is not None:
        mask = attn_mask.to("cpu")
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.to(dtype)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.to("cpu")[:, None, None, :]

    scores = scores.masked_fill(~allowed, -math.inf)
    # A row is dead when no key is left: by the boolean masks, causality, Lk = 0 or a float
    # mask of -inf everywhere. Its scores are set to 0 before the softmax so that no NaN
    # appears (in values or gradients), and its probabilities to 0 after.
    dead = (scores == -math.inf).all(dim=-1, keepdim=True)  # [B, Hq, Lq, 1]
    scores = scores.masked_fill(dead, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(dead, 0.0)
    lse = lse.masked_fill(dead, -math.inf).squeeze(-1)

    if dropout_p > 0.0:
        keep = dropout_mask.to("cpu", torch.bool)
        probs = probs.masked_fill(~keep, 0.0) / (1.0 - dropout_p)
    out = torch.matmul(probs, vc)
    return (out, lse) if return_lse else out
