"""``memattn.attention``: memory-efficient scaled dot-product attention for PyTorch tensors.

This module checks the Python side of a call (argument types, mask rank, dropout seed) and
hands it to ``memattn._ops.attention``: the custom op ``memattn::attention_forward``, which is
differentiable and works under torch.compile, or in plain eager calls the same computation
without the op's dispatch overhead.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from memattn import _memattn, _ops

__all__ = ["attention", "explain"]

# The dropout seed is drawn from [0, 2**62): any value keys the 64-bit Philox stream, and the
# bound keeps it positive in an int64 tensor.
_SEED_BOUND = 2**62


def attention(
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
    return_lse: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention that never materialises the ``Lq x Lk`` score matrix.

    Computes ``softmax(q @ k^T * scale + mask) @ v`` per head with PyTorch's SDPA conventions,
    in one tiled pass (online softmax); backward recomputes the probabilities from the saved
    log-sum-exp, so memory stays O(L) in both directions.

    Shapes (names used throughout memattn)::

        q:   [B, Hq, Lq, D]     k: [B, Hk, Lk, D]     v: [B, Hk, Lk, Dv]
        out: [B, Hq, Lq, Dv]    lse: [B, Hq, Lq] (float32; float64 for float64 inputs)

    ``Lq != Lk`` (cross-attention) is ordinary. ``Hq`` must be a multiple of ``Hk``: query
    head ``h`` uses key/value head ``h // (Hq // Hk)`` (GQA; ``Hk = 1`` is MQA), without
    repeating k and v in memory. ``D`` and ``Dv`` may differ, each in ``[1, 256]``. Any strides
    are accepted, e.g. ``x.view(B, L, H, D).transpose(1, 2)``; then ``out`` has the same
    layout, so ``out.transpose(1, 2)`` is a free view.

    Args:
        q, k, v: float32, float64 or bfloat16 on CPU (float16, bfloat16, float32 with CUDA),
            all of one dtype and on one device.
        attn_mask: optional, broadcastable to ``[B, Hq, Lq, Lk]`` (fewer than 4 dims get
            leading size-1 dims; every dim must be 1 or the full size). Either bool,
            **True = attend** (SDPA's convention, the opposite of nn.MultiheadAttention's), or
            floating point (q's dtype or float32), **added** to the scaled scores. Broadcast
            dims are read with stride 0, never expanded. A float mask that requires grad gets
            its gradient (summed over its broadcast dims), e.g. a learned position bias.
            On Hopper GPUs the forward, and the backward of a bool or q-dtype mask without a
            gradient or dropout, skip the blocks such a mask hides entirely (False / -inf), so
            a causal, sliding-window or document mask costs about the attention it keeps.
        key_padding_mask: optional bool ``[B, Lk]``, **True = padding** (that key is
            ignored for every query of the batch entry). Cheaper than an equivalent
            ``[B, 1, 1, Lk]`` attn_mask.
        is_causal: mask out keys "in the future" of each query, aligned by
            ``causal_alignment``. Combines with both masks.
        causal_alignment: ``"top_left"`` (PyTorch's SDPA): query ``i`` sees keys
            ``j <= i``; or ``"bottom_right"`` (flash-attn's, for decoding with a KV cache):
            query ``i`` sees keys ``j <= i + Lk - Lq``. For ``Lq = 3``, ``Lk = 5``
            (x = may attend)::

                top_left          bottom_right
                x . . . .         x x x . .
                x x . . .         x x x x .
                x x x . .         x x x x x

            With ``Lq > Lk`` and bottom_right, the first ``Lq - Lk`` queries see no key.
        dropout_p: probability of dropping an attention weight, in ``[0, 1)``; kept weights
            are scaled by ``1 / (1 - dropout_p)``. Applied whenever it is > 0: pass
            ``dropout_p if self.training else 0.0`` as with SDPA. The mask comes from a
            counter-based generator (Philox) keyed by one seed drawn per call from
            ``generator`` (torch's default CPU generator when None), so backward regenerates
            exactly the forward's mask and ``torch.manual_seed`` makes runs reproducible.
        scale: factor applied to ``q @ k^T``; default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of each query row.
        generator: a CPU ``torch.Generator`` to draw the dropout seed from.

    Returns:
        ``out`` ``[B, Hq, Lq, Dv]`` in q's dtype, or ``(out, lse)`` when ``return_lse``:
        ``lse`` ``[B, Hq, Lq]`` float32 (float64 for float64 inputs), the natural log of the
        sum over keys of ``exp(score)`` (scaled, masked, before dropout). ``lse`` is not
        differentiable.

    A query row whose keys are all masked (by any combination of the masks and causality, or
    ``Lk = 0``) gives output 0, gradient 0 and ``lse = -inf``, never NaN.

    Raises:
        TypeError: an argument of the wrong Python type, or a tensor of the wrong dtype.
        ValueError: inconsistent shapes, devices or option values. Messages name the
            argument, what it got and what it needs.
        NotImplementedError: a valid call that no backend of this build can run (e.g.
            float16 on CPU); ``memattn.explain`` lists every backend's reasons.

    Example::

        >>> q = torch.randn(2, 8, 128, 64)
        >>> k, v = torch.randn(2, 2, 256, 64), torch.randn(2, 2, 256, 64)  # GQA, Hk = 2
        >>> out = memattn.attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
        >>> out.shape
        torch.Size([2, 8, 128, 64])
    """
    _check_types(
        q, k, v, attn_mask, key_padding_mask, is_causal, causal_alignment, dropout_p, scale
    )
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected a torch.Generator or None, got {type(generator).__name__}"
        )
    _check_devices(q, k, v, attn_mask, key_padding_mask)
    mask4 = _mask_4d(attn_mask)
    dropout_p = float(dropout_p)
    scale = None if scale is None else float(scale)

    # While torch.compile traces, the op's fake implementation validates instead: the call
    # into the extension would break the graph here. Calls without dropout whose tensors the
    # core can take as they are leave validation to the core, which checks every call before
    # it touches memory (the Python-side check costs ~7-9 us a call); calls with dropout
    # validate first, so that a bad call never draws a seed.
    if not torch.compiler.is_compiling() and not (
        dropout_p == 0.0 and _ops.core_validates(q, k, v, mask4, key_padding_mask)
    ):
        _ops._validate(
            q, k, v, mask4, key_padding_mask, is_causal, causal_alignment, dropout_p, scale
        )

    seed = None
    if dropout_p > 0.0:
        seed = _draw_seed(generator)
    out, lse = _ops.attention(
        q,
        k,
        v,
        mask4,
        key_padding_mask,
        is_causal,
        causal_alignment,
        dropout_p,
        seed,
        scale,
    )
    return (out, lse) if return_lse else out


def explain(
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
    backward: bool = False,
    **_ignored,
) -> dict:
    """The plan ``attention`` would follow for these arguments, without running anything.

    Returns a dict: ``backend`` (e.g. ``"cpu"``, or ``""`` when none can run the call),
    ``kernel`` (e.g. ``"cpu/avx512/f32"``), ``reason`` (one line) and ``verdicts``, a list of
    ``(backend, [reasons it cannot run])`` for every backend considered, the chosen one
    included (with an empty list), and ``layout_copies``: the inputs copied (or zero-padded in
    the head dim) first because the CUDA kernels need another layout, each with why.
    ``backward=True`` plans the backward pass; CUDA plans then add ``backward_passes``: 1 for
    the Hopper single pass (dQ summed with atomic adds, its last bits vary run to run; or, for
    calls whose keys fit one block of 128 without causal limit or key padding at head dims up
    to 128, dQ written directly, deterministic), 2 for
    the atomic-free passes (other GPUs, dropout, an ``attn_mask`` other than a bool or q-dtype
    mask with 16-byte-aligned rows at head dims up to 128, a mask that requires grad, or under
    ``torch.use_deterministic_algorithms(True)``; at head dims over 128 these are the sm80
    kernels). Other keyword arguments of ``attention``
    (``return_lse``, ``generator``) are accepted and ignored.
    Raises like ``attention`` for invalid arguments.
    """
    _check_types(
        q, k, v, attn_mask, key_padding_mask, is_causal, causal_alignment, dropout_p, scale
    )
    if not isinstance(backward, bool):
        raise TypeError(f"backward: expected a bool, got {type(backward).__name__}")
    _check_devices(q, k, v, attn_mask, key_padding_mask)
    mask4 = _mask_4d(attn_mask)
    specs, copies = [], []
    for name, t in (("q", q), ("k", k), ("v", v)):
        spec, note = _ops.cuda_ready_spec(t)
        specs.append(spec)
        if note is not None:
            copies.append(f"{name}: {note}")
    d, dv = specs[0][1][-1], specs[2][1][-1]  # None: a symbolic size while tracing
    # How the backward would get dQ from the Hopper single pass (_ops.dq_path, its rule).
    dq_path = (
        _ops.dq_path(
            q,
            k,
            d,
            dv,
            mask4,
            key_padding_mask,
            is_causal,
            float(dropout_p),
            scale,
            mask4 is not None and mask4.requires_grad,
        )
        if backward and None not in (d, dv)
        else None
    )
    plan = _memattn.plan(
        *specs,
        None if mask4 is None else _ops.tensor_spec(mask4),
        None if key_padding_mask is None else _ops.tensor_spec(key_padding_mask),
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        dropout_p=float(dropout_p),
        scale=None if scale is None else float(scale),
        backward=backward,
        grad_q_accum_scratch=dq_path == "accumulated",
    )
    plan["layout_copies"] = copies
    if backward and plan["backend"] == "cuda":
        single = plan["kernel"].startswith("cuda/sm90/") and dq_path is not None
        plan["backward_passes"] = 1 if single else 2
    if copies and plan["backend"]:
        plan["reason"] += "; copied first: " + "; ".join(copies)
    return plan


def _type_name(x) -> str:
    return type(x).__name__


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_types(
    q, k, v, attn_mask, key_padding_mask, is_causal, causal_alignment, dropout_p, scale
):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {_type_name(t)}")
    for name, t in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {_type_name(t)}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {_type_name(is_causal)}")
    if not isinstance(causal_alignment, str):
        raise TypeError(
            "causal_alignment: expected a str ('top_left' or 'bottom_right'), "
            f"got {_type_name(causal_alignment)}"
        )
    if not _is_real(dropout_p):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {_type_name(dropout_p)}")
    if scale is not None and not _is_real(scale):
        raise TypeError(f"scale: expected a float or None, got {_type_name(scale)}")


def _check_devices(q, k, v, attn_mask, key_padding_mask):
    # The metadata specs carry the device type only; the index is checked here.
    for name, t in (
        ("k", k),
        ("v", v),
        ("attn_mask", attn_mask),
        ("key_padding_mask", key_padding_mask),
    ):
        if t is not None and t.device != q.device:
            raise ValueError(
                f"{name}: expected a tensor on q's device {q.device}, got one on {t.device}; "
                f"move it with .to({str(q.device)!r})"
            )


def _mask_4d(attn_mask: Tensor | None) -> Tensor | None:
    """attn_mask as a 4-D view, leading size-1 dims prepended (what the core takes)."""
    if attn_mask is None:
        return None
    rank = attn_mask.dim()
    if rank > 4:
        raise ValueError(
            f"attn_mask: expected at most 4 dims broadcastable to [B, Hq, Lq, Lk], got "
            f"{rank} dims of shape {list(attn_mask.shape)}"
        )
    return attn_mask[(None,) * (4 - rank)] if rank < 4 else attn_mask


def _draw_seed(generator: torch.Generator | None) -> Tensor:
    if generator is not None and generator.device.type != "cpu":
        # Reading a seed drawn on the GPU would synchronise the device behind the caller's back.
        raise ValueError(
            f"generator: expected a CPU torch.Generator (the dropout seed is drawn on the host), "
            f"got one on {generator.device}"
        )
    return torch.randint(0, _SEED_BOUND, (1,), generator=generator, dtype=torch.int64)
