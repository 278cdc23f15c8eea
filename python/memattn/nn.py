"""``memattn.nn``: drop-in modules that run ``memattn.attention``.

- ``MultiheadAttention``: ``torch.nn.MultiheadAttention`` with the same constructor, parameters,
  ``state_dict`` keys, forward signature, return values, mask conventions and errors, whose
  attention runs memattn's memory-efficient kernels (it is a subclass, so ``isinstance(m,
  torch.nn.MultiheadAttention)`` holds and everything that reads nn.MHA's attributes keeps
  working).
- ``TransformerEncoderLayer``, ``TransformerEncoder``, ``TransformerDecoderLayer``: torch's layers
  built with memattn attention. The encoder classes never take torch's fused inference fast path
  (``torch._transformer_encoder_layer_fwd``, nested tensors), which would read ``self_attn``'s
  weights and never call it: in eval and under no_grad memattn really runs, without touching the
  process-wide ``torch.backends.mha.set_fastpath_enabled`` switch.

``memattn.optimize(model)`` (``memattn.convert``) turns the torch modules of an existing model
into these, in place and reversibly.
"""

from __future__ import annotations

import contextvars
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from memattn.functional import attention

__all__ = [
    "MultiheadAttention",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "attention_weights",
]

# Set by ``memattn.inspect`` while it records a forward pass: an object with a ``record_memattn``
# method (see memattn/inspect.py). None otherwise, and then recording costs one lookup per call.
_TRACER: contextvars.ContextVar = contextvars.ContextVar("memattn_tracer", default=None)

# Budget of one block of attention weights (need_weights=True), in elements: the weights are
# computed this many at a time from the saved log-sum-exp, never as a second full score matrix.
_WEIGHTS_BLOCK_ELEMENTS = 1 << 22


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of memattn's lse (and of our softmax statistics): float64 for float64, else
    float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_mask_dtype(mask: Tensor | None, name: str) -> None:
    # torch.nn.functional._canonical_mask's check, with its message.
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")


# True while a memattn Transformer layer or encoder has already warned about its masks, so
# that the attention inside does not warn again (torch warns once, where it canonicalises).
_MASKS_WARNED: contextvars.ContextVar = contextvars.ContextVar(
    "memattn_masks_warned", default=False
)


def _suppress_mask_warnings():
    # torch.compile can't trace ContextVar; compiled code just warns again (harmless).
    return None if torch.compiler.is_compiling() else _MASKS_WARNED.set(True)


def _restore_mask_warnings(token) -> None:
    if token is not None:
        _MASKS_WARNED.reset(token)


def _run_with_checked_masks(forward, src, attn_mask, key_padding_mask, is_causal, names):
    """Checks a container's masks once (dtypes, mismatched kinds: torch's checks and warnings)
    and runs ``forward(src, attn_mask, key_padding_mask, is_causal)`` with the attention inside
    told not to warn about them again. ``names``: (key padding mask's name, attn mask's name)."""
    padding_name, mask_name = names
    _check_mask_dtype(key_padding_mask, padding_name)
    _warn_mismatched_masks(key_padding_mask, attn_mask, names)
    _check_mask_dtype(attn_mask, mask_name)
    token = _suppress_mask_warnings()
    try:
        return forward(src, attn_mask, key_padding_mask, is_causal)
    finally:
        _restore_mask_warnings(token)


def _tracer():
    """The active ``memattn.inspect`` recorder, or None (always None while compiling)."""
    return None if torch.compiler.is_compiling() else _TRACER.get()


def _warn_mismatched_masks(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    names: tuple[str, str] = ("key_padding_mask", "attn_mask"),
) -> None:
    # torch warns with these words when the two masks' dtypes differ.
    if (
        key_padding_mask is not None
        and attn_mask is not None
        and key_padding_mask.dtype != attn_mask.dtype
        and (torch.compiler.is_compiling() or not _MASKS_WARNED.get())
    ):
        warnings.warn(
            f"Support for mismatched {names[0]} and {names[1]} is deprecated. "
            "Use same type for both instead.",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Extra key columns (add_bias_kv, add_zero_attn) without concatenating K and V
# --------------------------------------------------------------------------------------------
#
# nn.MHA appends up to two key/value columns after the in-projection: bias_k/bias_v (one learned
# vector per head) and a zero key/value. Instead of copying K and V into tensors one or two
# columns longer, memattn runs on the real columns and merges the extra ones by their
# log-sum-exp: with lse_m the log-sum-exp of the real columns and s_e the extra scores,
#
#     lse = logsumexp(lse_m, s_e...)      out = exp(lse_m - lse) * out_m + sum_e exp(s_e - lse) v_e
#
# Backward calls memattn's backward with the *merged* out and lse: for the real columns the
# probabilities are then exp(s - lse) and delta = rowsum(dO * out) is the merged one, which is
# exactly the gradient of the merged attention. The extra columns' share is computed here.


def _extra_scores(
    q: Tensor, bias_k: Tensor | None, n_zero: int, Lk: int, causal: bool, scale: float
) -> Tensor:
    """Scores of the virtual columns, [B, H, Lq, n_extra] in the statistics dtype.

    Column ``Lk + e`` (bias_k first, then the zero column) is visible to every query, except
    under ``causal`` (top-left, as nn.MHA's SDPA call sees the concatenated keys): query ``i``
    sees it only when ``i >= Lk + e``.
    """
    B, H, Lq, _ = q.shape
    st = _stat_dtype(q.dtype)
    cols = []
    if bias_k is not None:
        cols.append(torch.einsum("bhld,hd->bhl", q.to(st), bias_k.to(st)) * scale)
    for _ in range(n_zero):
        cols.append(q.new_zeros((B, H, Lq), dtype=st))
    s_e = torch.stack(cols, dim=-1)
    if causal:
        i = torch.arange(Lq, device=q.device).unsqueeze(1)
        col = Lk + torch.arange(s_e.shape[-1], device=q.device).unsqueeze(0)
        s_e = s_e.masked_fill(i < col, -math.inf)
    return s_e


def _exp_minus(s: Tensor, lse: Tensor) -> Tensor:
    """exp(s - lse) with 0 where lse is -inf (a row with no visible key at all)."""
    dead = lse == -math.inf
    return torch.where(dead, torch.zeros_like(s), torch.exp(s - torch.where(dead, 0.0, lse)))


class _VirtualColumnsAttention(torch.autograd.Function):
    """memattn attention over K/V plus virtual key columns (see the comment above)."""

    @staticmethod
    def forward(ctx, q, k, v, bias_k, bias_v, attn_mask, key_padding_mask, options):
        n_zero, causal, dropout_p, scale = options
        st = _stat_dtype(q.dtype)
        seed = None
        if dropout_p > 0.0:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        out_m, lse_m = torch.ops.memattn.attention_forward(
            q, k, v, attn_mask, key_padding_mask, causal, "top_left", dropout_p, seed, scale
        )
        s_e = _extra_scores(q, bias_k, n_zero, k.shape[2], causal, scale)
        lse = torch.logsumexp(torch.cat([lse_m.unsqueeze(-1).to(st), s_e], dim=-1), dim=-1)
        alpha = _exp_minus(lse_m.to(st), lse)
        p_e = _exp_minus(s_e, lse.unsqueeze(-1))
        keep_e = None
        if dropout_p > 0.0:
            keep_e = (torch.rand_like(p_e) >= dropout_p).to(st) / (1.0 - dropout_p)
            p_e = p_e * keep_e
        out = alpha.unsqueeze(-1) * out_m.to(st)
        if bias_v is not None:
            out = out + p_e[..., :1] * bias_v.to(st)[None, :, None, :]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, bias_k, bias_v, attn_mask, key_padding_mask, seed, out, lse)
        ctx.keep_e = keep_e
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, bias_k, bias_v, attn_mask, key_padding_mask, seed, out, lse = ctx.saved_tensors
        n_zero, causal, dropout_p, scale = ctx.options
        st = _stat_dtype(q.dtype)
        needs = ctx.needs_input_grad
        mask_needs_grad = bool(attn_mask is not None and attn_mask.is_floating_point() and needs[5])
        grad_out = grad_out.contiguous()
        gq, gk, gv, gmask = torch.ops.memattn.attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            attn_mask,
            key_padding_mask,
            causal,
            "top_left",
            dropout_p,
            seed,
            scale,
            mask_needs_grad,
        )
        g_bias_k = g_bias_v = None
        if bias_k is not None:
            s_e = _extra_scores(q, bias_k, n_zero, k.shape[2], causal, scale)
            p_b = _exp_minus(s_e[..., 0], lse)  # [B, H, Lq], before dropout
            keep_b = 1.0 if ctx.keep_e is None else ctx.keep_e[..., 0]
            go = grad_out.to(st)
            delta = (go * out.to(st)).sum(-1)  # [B, H, Lq]
            dp_b = torch.einsum("bhld,hd->bhl", go, bias_v.to(st)) * keep_b
            ds_b = p_b * (dp_b - delta)
            gq = (gq.to(st) + scale * ds_b.unsqueeze(-1) * bias_k.to(st)[None, :, None, :]).to(
                q.dtype
            )
            g_bias_k = (scale * torch.einsum("bhl,bhld->hd", ds_b, q.to(st))).to(bias_k.dtype)
            g_bias_v = torch.einsum("bhl,bhld->hd", p_b * keep_b, go).to(bias_v.dtype)
        return (
            gq if needs[0] else None,
            gk if needs[1] else None,
            gv if needs[2] else None,
            g_bias_k if needs[3] else None,
            g_bias_v if needs[4] else None,
            gmask.to(attn_mask.dtype) if mask_needs_grad else None,
            None,
            None,
        )


def _mask_4d(mask: Tensor | None) -> Tensor | None:
    if mask is None or mask.dim() == 4:
        return mask
    return mask[(None,) * (4 - mask.dim())]


# --------------------------------------------------------------------------------------------
# Attention weights from the log-sum-exp, block by block
# --------------------------------------------------------------------------------------------


def attention_weights(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    scale: float | None = None,
    extra_scores: Tensor | None = None,
    average_heads: bool = False,
    differentiable: bool = False,
) -> Tensor:
    """The attention probabilities of a ``memattn.attention`` call, computed block-wise.

    ``q [B, Hq, Lq, D]``, ``k [B, Hk, Lk, D]`` (GQA allowed), ``lse [B, Hq, Lq]`` as returned
    with ``return_lse=True``; masks with memattn's conventions (bool True = attend, float added,
    ``key_padding_mask`` True = padding). ``extra_scores [B, Hq, Lq, n]``: scores of virtual
    columns appended after the ``Lk`` keys (nn.MHA's ``add_bias_kv`` / ``add_zero_attn``).

    Returns ``[B, Hq, Lq, Lk + n]`` in q's dtype, or ``[B, Lq, Lk + n]`` averaged over heads with
    ``average_heads`` (then only that is ever held, not the per-head weights). Weights are
    ``exp(score - lse)``, computed for a block of query rows at a time so that besides the
    result only one block of scores exists. Rows with no visible key are 0.

    ``differentiable=True`` computes each block with ``softmax`` under autograd instead, so the
    weights carry gradients to q, k and a float mask (``lse`` is not differentiable).
    """
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    n_extra = 0 if extra_scores is None else extra_scores.shape[-1]
    st = _stat_dtype(q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    kf = k.to(st)
    if Hk != Hq:
        kf = kf.repeat_interleave(Hq // Hk, dim=1)
    mask4 = _mask_4d(attn_mask)
    width = Lk + n_extra
    rows = max(1, _WEIGHTS_BLOCK_ELEMENTS // max(1, B * Hq * width))
    blocks = []
    result = None
    if not differentiable:
        shape = (B, Lq, width) if average_heads else (B, Hq, Lq, width)
        result = q.new_empty(shape)
    for r0 in range(0, Lq, rows):
        r1 = min(Lq, r0 + rows)
        s = torch.matmul(q[:, :, r0:r1].to(st), kf.transpose(-2, -1)) * scale
        if mask4 is not None:
            m = mask4 if mask4.shape[2] == 1 else mask4[:, :, r0:r1]
            if m.dtype == torch.bool:
                s = s.masked_fill(~m, -math.inf)
            else:
                s = s + m.to(st)
        if key_padding_mask is not None:
            s = s.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
        if is_causal:
            offset = 0 if causal_alignment == "top_left" else Lk - Lq
            i = torch.arange(r0, r1, device=q.device).unsqueeze(1)
            j = torch.arange(Lk, device=q.device).unsqueeze(0)
            s = s.masked_fill(j > i + offset, -math.inf)
        if extra_scores is not None:
            s = torch.cat([s, extra_scores[:, :, r0:r1].to(st)], dim=-1)
        lse_b = lse[:, :, r0:r1].to(st).unsqueeze(-1)
        if differentiable:
            w = torch.softmax(s, dim=-1)
            w = torch.where(lse_b == -math.inf, torch.zeros_like(w), w)
        else:
            w = _exp_minus(s, lse_b)
        if average_heads:
            w = w.mean(dim=1)
        if differentiable:
            blocks.append(w.to(q.dtype))
        elif average_heads:
            result[:, r0:r1] = w
        else:
            result[:, :, r0:r1] = w
    if differentiable:
        return torch.cat(blocks, dim=-2)
    return result


# --------------------------------------------------------------------------------------------
# MultiheadAttention
# --------------------------------------------------------------------------------------------


class MultiheadAttention(torch.nn.MultiheadAttention):
    r"""``torch.nn.MultiheadAttention`` whose attention runs ``memattn.attention``.

    Same constructor (``embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None``),
    same parameters and ``state_dict`` keys (``in_proj_weight`` or ``q/k/v_proj_weight``,
    ``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj.*``: checkpoints load both ways), same
    forward signature and return values, same errors for bad input (types and messages), and
    nn.MHA's conventions, translated to memattn's:

    - bool ``attn_mask`` True = masked **out** (nn.MHA; SDPA and memattn use the opposite),
      float ``attn_mask`` added; 2-D ``[Lq, Lk]`` or 3-D ``[B * num_heads, Lq, Lk]``;
    - bool ``key_padding_mask`` ``[B, Lk]`` True = padding, passed to memattn as it is (read
      per key block, no ``[B, 1, Lq, Lk]`` mask is built); a float one is added;
    - ``is_causal`` is only a hint, as in torch: it needs an ``attn_mask`` (else
      ``RuntimeError``); with ``need_weights=False`` and no ``key_padding_mask`` the mask is
      dropped and memattn runs causal (top-left, with block skipping); otherwise the mask is
      used and the hint ignored;
    - unbatched ``[L, E]`` input, ``batch_first``, ``kdim``/``vdim``, ``add_bias_kv``,
      ``add_zero_attn``, dropout on the attention probabilities in training.

    ``need_weights=True`` (the default, as in torch) returns the weights too, but the output
    still comes from the memory-efficient kernel; the weights are ``exp(score - lse)`` from
    the kernel's log-sum-exp, computed a block of query rows at a time (averaged over heads
    as they go when ``average_attn_weights``). They carry gradients when autograd needs them.
    Pass ``need_weights=False`` when you don't use them: that never materialises ``Lq x Lk``.

    ``add_bias_kv`` and ``add_zero_attn`` run as virtual key columns merged through the
    log-sum-exp: K and V are never copied into longer tensors.

    Differences from torch, all deliberate:

    - a query row whose keys are all masked gives output 0 (and weights 0) where torch gives
      NaN;
    - torch's eval fast path (``torch._native_multi_head_attention``) is never taken, so the
      ``is_causal``-without-mask error is raised in eval too (torch's fast path silently runs
      such a call without any mask);
    - with dropout in training, returned weights are the probabilities before dropout (torch
      returns them after its own dropout; the random masks of the two libraries differ anyway);
    - nested-tensor inputs (self-attention, ``batch_first``, no masks) are padded and run as a
      padded batch; weights are not returned for them.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same arguments and returns as ``torch.nn.MultiheadAttention.forward``: ``(attn_output,
        attn_output_weights or None)``; see the class docstring for memattn's specifics."""
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, attn_mask)
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _warn_mismatched_masks(key_padding_mask, attn_mask)
        _check_mask_dtype(attn_mask, "attn_mask")
        is_batched = F._mha_shape_check(
            query, key, value, key_padding_mask, attn_mask, self.num_heads
        )
        if not is_batched:
            # One code path: unbatched input is a batch of one in batch-first layout.
            # (keeping query is key is value where it holds: it selects the fused projection)
            q1 = query.unsqueeze(0)
            k1 = q1 if key is query else key.unsqueeze(0)
            v1 = k1 if value is key else (q1 if value is query else value.unsqueeze(0))
            query, key, value = q1, k1, v1
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        batch_first = self.batch_first or not is_batched
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. "
                "You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        out, weights = self._attend(
            query,
            key,
            value,
            batch_first,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )
        if not is_batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    # The body of forward, on batched input in either layout ([B, L, E] when batch_first).
    def _attend(
        self,
        query,
        key,
        value,
        batch_first,
        key_padding_mask,
        need_weights,
        attn_mask,
        average_attn_weights,
        is_causal,
    ):
        H, E = self.num_heads, self.embed_dim
        D = self.head_dim
        b_dim, l_dim = (0, 1) if batch_first else (1, 0)
        B, Lq, Lk = query.shape[b_dim], query.shape[l_dim], key.shape[l_dim]

        def torch_layout(x: Tensor) -> Tensor:
            # Shapes in error messages are the [L, B, E] ones torch reports.
            return x.transpose(0, 1) if batch_first else x

        if query.shape[-1] != E:
            raise AssertionError(
                f"was expecting embedding dimension of {E}, but got {query.shape[-1]}"
            )
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(
                    f"key shape {torch_layout(key).shape} does not match value shape "
                    f"{torch_layout(value).shape}"
                )
        elif key.shape[:2] != value.shape[:2]:
            raise AssertionError(
                f"key's sequence and batch dims {torch_layout(key).shape[:2]} do not match "
                f"value's {torch_layout(value).shape[:2]}"
            )

        q, k, v = self._project(query, key, value)  # each [.., .., E] in the input layout

        # is_causal is a hint (torch's rules): it replaces the mask only when nothing else
        # needs the mask.
        causal = False
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask, causal = None, True
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (Lq, Lk):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                        f"{(Lq, Lk)}."
                    )
            elif attn_mask.shape != (B * H, Lq, Lk):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(B * H, Lq, Lk)}."
                )
        if (self.bias_k is None) != (self.bias_v is None):
            raise AssertionError(
                "bias_k is set but bias_v is None"
                if self.bias_v is None
                else "bias_v is set but bias_k is None"
            )
        n_extra = int(self.bias_k is not None) + int(bool(self.add_zero_attn))
        if key_padding_mask is not None:
            if key_padding_mask.shape[0] != B:
                raise AssertionError(
                    f"Expected key_padded_mask.shape[0] to be {B}, but got "
                    f"{key_padding_mask.shape[0]}"
                )
            if key_padding_mask.shape[1] != Lk:
                raise AssertionError(
                    f"Expected key_padded_mask.shape[1] to be {Lk + n_extra}, but got "
                    f"{key_padding_mask.shape[1] + n_extra}"
                )

        # Heads as strided views [B, H, L, D] of the projections: no copy.
        def heads(x: Tensor, L: int) -> Tensor:
            if batch_first:
                return x.unflatten(-1, (H, D)).transpose(1, 2)
            return x.unflatten(-1, (H, D)).permute(1, 2, 0, 3)

        qh, kh, vh = heads(q, Lq), heads(k, Lk), heads(v, Lk)
        mask, kpm = self._memattn_masks(attn_mask, key_padding_mask, B, Lq, Lk, qh.dtype)
        dropout_p = float(self.dropout) if self.training else 0.0
        scale = 1.0 / math.sqrt(D)

        tracer = _tracer()
        if tracer is not None:
            tracer.record_memattn(
                self,
                qh,
                kh,
                vh,
                {
                    "attn_mask": mask,
                    "key_padding_mask": kpm,
                    "is_causal": causal,
                    "dropout_p": dropout_p,
                },
                self_attention=query is key,
                note=self._path_note(need_weights, n_extra),
            )

        lse = extra = None
        if n_extra:
            bias_k = None if self.bias_k is None else self.bias_k.reshape(H, D)
            bias_v = None if self.bias_v is None else self.bias_v.reshape(H, D)
            out, lse = _VirtualColumnsAttention.apply(
                qh,
                kh,
                vh,
                bias_k,
                bias_v,
                _mask_4d(mask),
                kpm,
                (int(bool(self.add_zero_attn)), causal, dropout_p, scale),
            )
            if need_weights:
                extra = _extra_scores(qh, bias_k, int(bool(self.add_zero_attn)), Lk, causal, scale)
        elif need_weights:
            out, lse = attention(
                qh,
                kh,
                vh,
                attn_mask=mask,
                key_padding_mask=kpm,
                is_causal=causal,
                dropout_p=dropout_p,
                scale=scale,
                return_lse=True,
            )
        else:
            out = attention(
                qh,
                kh,
                vh,
                attn_mask=mask,
                key_padding_mask=kpm,
                is_causal=causal,
                dropout_p=dropout_p,
                scale=scale,
            )
        # out: [B, H, Lq, D] -> the input layout, then the output projection.
        if batch_first:
            out = out.transpose(1, 2).reshape(B, Lq, E)
        else:
            out = out.permute(2, 0, 1, 3).reshape(Lq, B, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not need_weights:
            return out, None
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (qh, kh, mask, extra)
        )
        weights = attention_weights(
            qh,
            kh,
            lse,
            attn_mask=mask,
            key_padding_mask=kpm,
            is_causal=causal,
            scale=scale,
            extra_scores=extra,
            average_heads=average_attn_weights,
            differentiable=differentiable,
        )
        return out, weights

    def _path_note(self, need_weights: bool, n_extra: int) -> str:
        notes = []
        if n_extra:
            notes.append(f"{n_extra} virtual key column(s) (add_bias_kv / add_zero_attn)")
        if need_weights:
            notes.append("need_weights: weights computed block-wise from the lse")
        return "; ".join(notes)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """In-projections, in the input layout. Self-attention runs one fused GEMM and returns
        views of its output (torch copies them apart; memattn reads the strided views)."""
        E = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if self._qkv_same_embed_dim:
            if key is value:
                if query is key:
                    qkv = F.linear(query, w, b).unflatten(-1, (3, E))
                    return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
                w_q, w_kv = w.split([E, 2 * E])
                b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
                kv = F.linear(key, w_kv, b_kv).unflatten(-1, (2, E))
                return F.linear(query, w_q, b_q), kv[..., 0, :], kv[..., 1, :]
            w_q, w_k, w_v = w.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            Eq, Ek, Ev = query.shape[-1], key.shape[-1], value.shape[-1]
            for name, wt, want in (
                ("query", w_q, (Eq, Eq)),
                ("key", w_k, (Eq, Ek)),
                ("value", w_v, (Eq, Ev)),
            ):
                if wt.shape != want:
                    raise AssertionError(
                        f"expecting {name} weights shape of {want}, but got {wt.shape}"
                    )
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _memattn_masks(self, attn_mask, key_padding_mask, B, Lq, Lk, dtype):
        """nn.MHA's masks in memattn's conventions: ``(attn_mask, key_padding_mask)``.

        bool attn_mask is inverted (True = attend); a 3-D one is viewed as ``[B, H, Lq, Lk]``;
        a bool key_padding_mask passes through; a float one is folded into a float attn_mask.
        """
        mask = attn_mask
        if mask is not None:
            if mask.dim() == 3:
                mask = mask.reshape(B, self.num_heads, Lq, Lk)
            if mask.dtype == torch.bool:
                mask = ~mask
        kpm = key_padding_mask
        if kpm is not None and kpm.dtype != torch.bool:
            float_kpm = kpm.view(B, 1, 1, Lk)
            if mask is None:
                mask = float_kpm
            elif mask.dtype == torch.bool:
                # Mixed types (deprecated in torch, still accepted): both become additive.
                zeros = torch.zeros(mask.shape, dtype=float_kpm.dtype, device=mask.device)
                mask = zeros.masked_fill(~mask, -math.inf) + float_kpm
            else:
                mask = mask + float_kpm
            kpm = None
        if (
            mask is not None
            and mask.is_floating_point()
            and mask.dtype
            not in (
                dtype,
                torch.float32,
            )
        ):
            mask = mask.to(dtype)
        return mask, kpm

    def _forward_nested(self, query, key, value, key_padding_mask, attn_mask):
        why = ""
        if not (query is key and key is value):
            why = "non-self attention was used (query, key, and value are not the same Tensor)"
        elif not self.batch_first:
            why = "batch_first was not True"
        elif key_padding_mask is not None or attn_mask is not None:
            why = (
                "supplying both src_key_padding_mask and src_mask at the same time "
                "is not supported with NestedTensor input"
            )
        if why:
            raise AssertionError(
                "MultiheadAttention does not support NestedTensor outside of its fast path. "
                f"The fast path was not hit because {why}"
            )
        padded, kpm = _nested_to_padded(query)
        out, _ = self.forward(padded, padded, padded, key_padding_mask=kpm, need_weights=False)
        return torch._nested_tensor_from_mask(out, ~kpm, mask_check=False), None


def _nested_to_padded(x: Tensor) -> tuple[Tensor, Tensor]:
    """A nested ``[B, *, E]`` tensor as a padded ``[B, L, E]`` one and its key padding mask
    (True = padding)."""
    lengths = [t.shape[0] for t in x.unbind()]
    padded = x.to_padded_tensor(0.0)
    positions = torch.arange(padded.shape[1], device=padded.device)
    kpm = positions.unsqueeze(0) >= torch.tensor(lengths, device=padded.device).unsqueeze(1)
    return padded, kpm


def _to_memattn_attention(module: torch.nn.Module) -> None:
    """Turns a plain ``torch.nn.MultiheadAttention`` into memattn's, in place (the class only:
    memattn's adds no state, so parameters, buffers and hooks stay as they are)."""
    if type(module) is torch.nn.MultiheadAttention:
        module.__class__ = MultiheadAttention


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` with memattn attention and no fused fast path.

    Same constructor, parameters and ``state_dict`` keys as torch's; ``self_attn`` is a
    ``memattn.nn.MultiheadAttention``. Torch's layer, in eval under no_grad, can call
    ``torch._transformer_encoder_layer_fwd`` with ``self_attn``'s weights and never call
    ``self_attn`` (that kernel materialises the scores); this one always takes the standard
    path, so memattn runs in training and inference alike. Masks are passed to ``self_attn``
    as given (a bool ``src_key_padding_mask`` stays bool: memattn reads it per key block).
    A nested-tensor ``src`` (from a plain ``torch.nn.TransformerEncoder``) is run padded.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _to_memattn_attention(self.self_attn)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        return _run_with_checked_masks(
            self._forward,
            src,
            src_mask,
            src_key_padding_mask,
            is_causal,
            ("src_key_padding_mask", "src_mask"),
        )

    def _forward(self, src, src_mask, src_key_padding_mask, is_causal):
        if src.is_nested:
            padded, kpm = _nested_to_padded(src)
            if not self.self_attn.batch_first:
                raise AssertionError(
                    "nested tensor input needs self_attn.batch_first=True, as in torch's layer"
                )
            out = self._forward(padded, src_mask, kpm, is_causal)
            return torch._nested_tensor_from_mask(out, ~kpm, mask_check=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(
                self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal
            )
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(
                x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal)
            )
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerEncoder(torch.nn.TransformerEncoder):
    """``torch.nn.TransformerEncoder`` that never converts its input to nested tensors.

    Torch's encoder, in eval under no_grad with a ``src_key_padding_mask``, packs the batch into
    a nested tensor and drops the mask so that its layers' fused fast path can skip padding;
    memattn skips padding itself (per key block), so this one passes the padded batch and the
    mask (as given, bool or float) to every layer. Everything else is torch's: the
    ``is_causal`` detection from ``mask``, the final ``norm``.

    Outputs at padded positions: torch's nested path returns 0 there (then the final norm);
    this encoder returns the values computed for those positions, as torch's own training path
    does. The outputs of real tokens are the same.
    """

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        return _run_with_checked_masks(
            self._forward,
            src,
            mask,
            src_key_padding_mask,
            is_causal,
            ("src_key_padding_mask", "mask"),
        )

    def _forward(self, src, mask, src_key_padding_mask, is_causal):
        from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

        first = self.layers[0]
        batch_first = first.self_attn.batch_first
        seq_len = _get_seq_len(src, batch_first)
        is_causal = _detect_is_causal_mask(mask, is_causal, seq_len)
        output = src
        for layer in self.layers:
            output = layer(
                output,
                src_mask=mask,
                is_causal=is_causal,
                src_key_padding_mask=src_key_padding_mask,
            )
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` whose ``self_attn`` and ``multihead_attn`` are
    ``memattn.nn.MultiheadAttention`` (torch's decoder layer has no fused fast path; nothing
    else changes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _to_memattn_attention(self.self_attn)
        _to_memattn_attention(self.multihead_attn)
