"""memattn's torch.library custom ops: the only place Python calls the C++ kernels.

Two ops, both functional (no mutation), so torch.compile, torch.export and AOT autograd treat
them as opaque nodes with known output shapes:

- ``memattn::attention_forward(q, k, v, attn_mask, key_padding_mask, ...) -> (out, lse)``
- ``memattn::attention_backward(grad_out, q, k, v, out, lse, ...) -> (grad_q, grad_k, grad_v,
  grad_attn_mask)``

The forward op is differentiable (``register_autograd``): it saves its inputs, ``out`` and
``lse`` and nothing else, and its backward calls the backward op. ``lse`` is an output for
callers that merge partial attentions; it is not differentiable.

``attention`` is the entry point: plain eager calls skip the ops' Python dispatch and run the
same implementation through an autograd.Function (``_EagerAttention``); anything that traces
or intercepts torch calls gets the op.

Every output is allocated here with torch (the core never allocates), so torch's caching
allocator and streams are respected: CUDA kernels are queued on torch's current stream. On CPU,
inputs are passed with their strides as they are (the core reads any strides). On CUDA the
kernels need a contiguous last dim, and the fp16/bf16 tensor-core kernels 16-byte aligned rows
and a head dim that is a multiple of 8: other inputs are copied (or zero-padded in the head
dim, which changes no result) by ``_cuda_ready``; ``memattn.explain`` reports when that happens.

Shapes: q [B, Hq, Lq, D], k [B, Hk, Lk, D], v [B, Hk, Lk, Dv], out [B, Hq, Lq, Dv],
lse [B, Hq, Lq] float32 (float64 for float64 inputs), attn_mask 4-D with each dim 1 or full,
key_padding_mask [B, Lk].
"""

import functools
from typing import Literal

import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack

from memattn import _memattn

__all__ = ["attention_backward", "attention_forward", "tensor_spec"]


def _concrete(n) -> int | None:
    """A size or stride as a Python int, without specialising a symbolic size.

    While torch.compile traces with dynamic shapes, sizes are SymInts; ``int(s)`` would add a
    guard and recompile for every new size. Validation only needs the value seen while tracing
    (the real call validates again), so read the hint instead; None for a size that has none
    (data-dependent), which skips validation while tracing.
    """
    if isinstance(n, int):
        return n
    from torch.fx.experimental import symbolic_shapes

    # optimization_hint in recent torch, hint_int before; neither adds a guard.
    hint = getattr(symbolic_shapes, "optimization_hint", None) or symbolic_shapes.hint_int
    try:
        return int(hint(n))
    except Exception:  # noqa: BLE001 - an unbacked size has no hint; validation waits for the call
        return None


def tensor_spec(t: Tensor) -> tuple[str, tuple[int | None, ...], tuple[int | None, ...], str]:
    """``(dtype name, shape, strides, device type)``: what ``_memattn.validate`` / ``plan`` take.

    Meta tensors are described as CPU tensors: they carry no data, and shape propagation on
    the meta device (e.g. models built under ``torch.device("meta")``) should validate shapes
    and dtypes like a CPU call instead of failing on the device. Symbolic sizes without a hint
    appear as None.
    """
    device = t.device.type
    if device == "meta":
        device = "cpu"
    shape, strides = tuple(t.shape), t.stride()
    if not all(type(n) is int for n in (*shape, *strides)):  # symbolic sizes while tracing
        shape = tuple(_concrete(n) for n in shape)
        strides = tuple(_concrete(n) for n in strides)
    return (str(t.dtype).removeprefix("torch."), shape, tuple(strides), device)


def _optional_spec(t: Tensor | None):
    return None if t is None else tensor_spec(t)


def _validate(q, k, v, attn_mask, key_padding_mask, is_causal, causal_alignment, dropout_p, scale):
    specs = [_optional_spec(t) for t in (q, k, v, attn_mask, key_padding_mask)]
    if any(None in spec[1] or None in spec[2] for spec in specs if spec is not None):
        return  # data-dependent sizes while tracing: the real call validates
    _memattn.validate(
        *specs,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        dropout_p=dropout_p,
        scale=scale,
    )


_EXPORTED_DTYPES = frozenset(
    (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)
)


def core_validates(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
) -> bool:
    """Whether a call may skip ``_validate`` and leave validation to the core (the extension
    validates every call before it touches memory, with the same messages): plain strided
    tensors of the ranks the output allocation reads (4-D q, k, v and attn_mask, 2-D
    key_padding_mask) in dtypes the DLPack export takes, so that nothing before the core's
    check can fail with another error. Anything else is validated in Python first."""
    for t, rank in ((q, 4), (k, 4), (v, 4), (attn_mask, 4), (key_padding_mask, 2)):
        if t is not None and (
            type(t) is not Tensor
            or t.dim() != rank
            or t.dtype not in _EXPORTED_DTYPES
            or t.layout != torch.strided
        ):
            return False
    return True


def _is_bshd(q: Tensor) -> bool:
    """True when q is a [B, H, L, D] view of contiguous [B, L, H, D] memory (nn.MHA's layout)."""
    return not q.is_contiguous() and q.transpose(1, 2).is_contiguous()


def _empty_out(q: Tensor, v: Tensor) -> Tensor:
    """out [B, Hq, Lq, Dv] in q's dtype, laid out like q when q is a transposed [B, L, H, D]
    view, so callers that transpose back to [B, L, H, Dv] get a free view instead of a copy."""
    B, Hq, Lq, _ = q.shape
    Dv = v.shape[3]
    if _is_bshd(q):
        return q.new_empty((B, Lq, Hq, Dv)).transpose(1, 2)
    return q.new_empty((B, Hq, Lq, Dv))


def _stat_dtype(q: Tensor) -> torch.dtype:
    """dtype of lse and of the mask gradient: float32, float64 for float64 inputs (so float64
    gradients, recomputed from lse, keep float64 precision)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _empty_lse(q: Tensor) -> Tensor:
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq), dtype=_stat_dtype(q))


def _empty_grad_mask(q: Tensor, attn_mask: Tensor | None, needs_grad: bool) -> Tensor:
    """Zeros (float32; float64 for float64 q) of the 4-D mask's shape, which the kernel adds
    dL/dmask into; empty when the mask needs no gradient.

    A size-1 dim receives the sum over that dim, as broadcasting means. A full-size dim with
    stride 0 (an expanded view) gets its full size here: autograd wants the gradient of an
    expanded tensor per element and sums it through the caller's ``expand`` itself; a summed
    size-1 gradient expanded back would be summed again, multiplied by that dim's size.
    """
    if not needs_grad or attn_mask is None:
        return q.new_empty((0,), dtype=_stat_dtype(q))
    return q.new_zeros(attn_mask.shape, dtype=_stat_dtype(q))


_TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)


def _head_dim_padding(dtype: torch.dtype, d: int) -> int:
    """Zero columns appended to a head dim of d before the CUDA kernels read it: the fp16/bf16
    tensor-core kernels need a multiple of 8; 0 for other dtypes."""
    return (-d) % 8 if dtype in _TENSOR_CORE_DTYPES else 0


def _stream(t: Tensor) -> int:
    """torch's current stream on t's device as an integer cudaStream_t (0 on CPU).

    Read with torch's raw-stream getter (what Triton's launcher uses): ``current_stream()``
    builds a Stream object, ~3 us per call on an H100 host.
    """
    if not t.is_cuda:
        return 0
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        return torch.cuda.current_stream(t.device).cuda_stream
    return raw(t.device.index)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    """Compute capability of a CUDA device, read once (``get_device_capability`` costs ~2 us)."""
    return torch.cuda.get_device_capability(device_index)


def _dl(t: Tensor | None):
    """t as a DLPack capsule for the extension (None stays None).

    nanobind would otherwise call ``t.__dlpack__()``, torch's Python-level export with stream
    and device checks (~2.4 us per tensor on an H100 host, 16 per forward + backward);
    ``to_dlpack`` exports the same view without them (~0.3 us). The kernels are queued on the
    stream passed explicitly, so the export needs no stream handling.
    """
    return None if t is None else to_dlpack(t)


def cuda_layout_copies(t: Tensor) -> str | None:
    """Why a CUDA tensor must be copied before memattn's CUDA kernels read it (None if not)."""
    if not t.is_cuda:
        return None
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return f"last dim not contiguous (strides {tuple(t.stride())})"
    if t.dtype in _TENSOR_CORE_DTYPES:
        d = t.shape[-1]
        pad = _head_dim_padding(t.dtype, d)
        if pad:
            return f"head dim {d} not a multiple of 8 (zero-padded to {d + pad})"
        if any(st % 8 for st, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1):
            return f"rows not 16-byte aligned (strides {tuple(t.stride())})"
        if t.data_ptr() % 16:
            return "data not 16-byte aligned"
    return None


def _cuda_ready(t: Tensor) -> Tensor:
    """t laid out as the CUDA kernels need (see cuda_layout_copies); t itself when it already is.
    A head dim that is not a multiple of 8 is zero-padded: zeros add nothing to q k^T, and
    padded value columns produce output columns that are sliced off."""
    # The common case in three cheap reads (a forward + backward checks 8 tensors): contiguous
    # with a last dim that is a multiple of 8 means 16-byte aligned rows for every dtype.
    if t.is_contiguous() and t.shape[-1] % 8 == 0 and t.data_ptr() % 16 == 0:
        return t
    if cuda_layout_copies(t) is None:
        return t
    pad = _head_dim_padding(t.dtype, t.shape[-1])
    if pad:
        return torch.nn.functional.pad(t, (0, pad))
    return t.contiguous()


def cuda_ready_spec(t: Tensor):
    """``(tensor_spec, note)`` of t as ``_cuda_ready`` will hand it to the kernels, without
    copying anything: for ``explain``. ``note`` says why a copy is made (None when none is)."""
    note = cuda_layout_copies(t)
    if note is None:
        return tensor_spec(t), None
    shape = [_concrete(n) for n in t.shape]
    if shape[-1] is not None:
        shape[-1] += _head_dim_padding(t.dtype, shape[-1])
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n or 1, 1)
    return (
        str(t.dtype).removeprefix("torch."),
        tuple(shape),
        tuple(reversed(strides)),
        "cuda",
    ), note


def _padded_like(t: Tensor, last: int) -> Tensor:
    """An empty tensor of t's shape with the last dim `last`, in t's dtype and device."""
    return t.new_empty((*t.shape[:-1], last))


def _into(dst: Tensor, src: Tensor) -> Tensor:
    """dst filled from src[..., :dst.shape[-1]] (src is dst's padded twin), or src itself."""
    if src is dst or src.shape == dst.shape:
        return src
    dst.copy_(src[..., : dst.shape[-1]])
    return dst


def _default_scale(q: Tensor, scale: float | None) -> float | None:
    """The softmax scale of the unpadded head dim (padding must not change 1 / sqrt(D))."""
    if scale is None and q.is_cuda and _head_dim_padding(q.dtype, q.shape[-1]):
        return q.shape[-1] ** -0.5
    return scale


def _full_length_mask_grad(
    attn_mask: Tensor, grad_mask: Tensor, lq: int, lk: int
) -> tuple[Tensor, Tensor]:
    """(mask, gradient buffer) for the CUDA backward. Its kernels sum a broadcast mask's gradient
    over batch and heads inside one block (no atomics) but need full query and key dims: a mask
    broadcast over queries or keys is expanded (a view), its gradient is taken at full size and
    summed back by ``_sum_to``. Returns the inputs unchanged when no dim needs it."""
    m0, m1, mq, mk = attn_mask.shape
    if (mq, mk) == (lq, lk):
        return attn_mask.detach(), grad_mask
    full = (m0, m1, lq, lk)
    return attn_mask.detach().expand(full), grad_mask.new_zeros(full)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """t summed over the dims where `shape` has size 1 (and t does not)."""
    dims = tuple(d for d in range(t.dim()) if shape[d] == 1 and t.shape[d] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _key_range_scratch(q: Tensor, key_padding_mask: Tensor | None) -> Tensor | None:
    """Scratch for the CUDA kernels' per-batch key ranges (first padded key, last unpadded key
    + 1), which let them skip fully padded key blocks; None where there is nothing to skip."""
    if key_padding_mask is None or not q.is_cuda:
        return None
    return q.new_empty((2 * q.shape[0],), dtype=torch.float32)


def _mask_block_scratch(q: Tensor, k: Tensor, attn_mask: Tensor | None) -> Tensor | None:
    """Scratch for the Hopper forward's lists of the key blocks a 4-D ``attn_mask`` leaves
    visible (the core's MaskBlockList), with which it skips the blocks the mask hides; None
    where no kernel takes them (no mask, not a compute capability 9.0 GPU). Sized for the
    smallest tiles (64 query rows, 64 keys): a count and an entry per key block, and the list's
    length, for each query tile of each (b, h) the mask does not broadcast, and a flag."""
    if attn_mask is None or not q.is_cuda or _capability(q.device.index) != (9, 0):
        return None
    B, Hq, Lq = q.shape[:3]
    Lk = k.shape[2]
    mask_b = B if attn_mask.shape[0] != 1 else 1
    mask_h = Hq if attn_mask.shape[1] != 1 else 1
    tiles = -(-Lq // 64) if attn_mask.shape[2] != 1 else 1
    words = 1 + mask_b * mask_h * tiles * (2 * -(-Lk // 64) + 1)
    return q.new_empty((words,), dtype=torch.float32)


def _mask_step_scratch(q: Tensor, k: Tensor, attn_mask: Tensor) -> Tensor:
    """Scratch for the Hopper single-pass backward's lists of the steps a 4-D ``attn_mask``
    leaves (the core's MaskStepList), with which it skips the blocks the mask hides: for each
    block of 128 keys of each (b, k/v head) the mask does not broadcast, a length and an entry
    per (query head of the group, block of 64 queries, the smaller of the kernels' two), and a
    flag. Only for calls ``dq_path`` sends to the single pass with dQ scratch."""
    B, Hq, Lq = q.shape[:3]
    Hk, Lk = k.shape[1], k.shape[2]
    mask_b = B if attn_mask.shape[0] != 1 else 1
    mask_hk = Hk if attn_mask.shape[1] != 1 else 1
    per_list = 1 + (Hq // Hk) * -(-Lq // 64)
    words = 1 + mask_b * mask_hk * -(-Lk // 128) * per_list
    return q.new_empty((words,), dtype=torch.float32)


def _single_pass_mask(mask: Tensor, q: Tensor, head_dim: int, mask_needs_grad: bool) -> bool:
    """Whether the Hopper single pass can take this 4-D attn_mask at this head dim (the larger
    of the kernels' two; up to 128): bool or q's dtype, with no gradient to compute, copied by
    mask tiles (contiguous keys, a 16-byte aligned start, strides of whole 16-byte units; size-1
    dims are broadcast and exempt). The rules of the core's make_mask_map
    (src/cuda/sm90/tensor_map.cu) and single_pass_serves_mask, stated again here because Python
    allocates the single pass's scratch."""
    if head_dim > 128 or mask_needs_grad or mask.dtype not in (torch.bool, q.dtype):
        return False
    if mask.shape[-1] < 2 or mask.stride(-1) != 1 or mask.data_ptr() % 16 != 0:
        return False
    unit = 16 // mask.element_size()  # elements per 16 bytes
    return all(mask.shape[d] == 1 or mask.stride(d) % unit == 0 for d in range(3))


def _hopper_lean_backward(
    q: Tensor, d: int, dv: int, dropout_p: float, scale: float | None
) -> bool:
    """What both Hopper single-pass variants need: fp16/bf16 on compute capability 9.0, no
    dropout, scale > 0 (else the core runs the general two passes)."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and dropout_p == 0.0
        and (scale is None or scale > 0)
        and _capability(q.device.index) == (9, 0)
    )


def single_pass_backward(
    q: Tensor,
    d: int,
    dv: int,
    attn_mask: Tensor | None,
    dropout_p: float,
    scale: float | None = None,
    mask_needs_grad: bool = False,
) -> bool:
    """Whether the CUDA backward may run the Hopper single pass, which sums dQ over key blocks
    with atomic adds into fp32 scratch (faster; dQ's last bits vary run to run). Not on other
    GPUs, not for calls it does not serve (dropout, scale <= 0, an attn_mask other than a bool
    or q-dtype one the mask tiles can copy at head dims up to 128, a mask gradient;
    ``attn_mask`` is the 4-D mask), and not under ``torch.use_deterministic_algorithms(True)``: then the
    atomic-free two passes run (at head dims over 128 the sm80 ones), bit-identical run to run.
    ``d``, ``dv``: the head dims the kernels see (after any padding). (The core also needs the
    sm90 kernels built and not disabled; it ignores the scratch otherwise.)"""
    return (
        _hopper_lean_backward(q, d, dv, dropout_p, scale)
        and (attn_mask is None or _single_pass_mask(attn_mask, q, max(d, dv), mask_needs_grad))
        and not torch.are_deterministic_algorithms_enabled()
    )


def direct_dq_backward(
    q: Tensor,
    k: Tensor,
    d: int,
    dv: int,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
) -> bool:
    """Whether the Hopper single pass writes dQ directly, with no scratch and no atomics (so
    also under ``torch.use_deterministic_algorithms(True)``): lean calls (no attn_mask, no
    dropout, scale > 0, head dims up to 128) whose keys fit one CTA's block (0 < Lk <= 128)
    and that skip no query row (no causal limit, no key padding). The core's sm90::direct_dq
    states the same rules."""
    return (
        _hopper_lean_backward(q, d, dv, dropout_p, scale)
        and max(d, dv) <= 128
        and attn_mask is None
        and key_padding_mask is None
        and not is_causal
        and 0 < k.shape[2] <= 128
    )


def dq_path(
    q: Tensor,
    k: Tensor,
    d: int,
    dv: int,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
    mask_needs_grad: bool,
) -> Literal["direct", "accumulated"] | None:
    """How the CUDA backward of this call gets dQ: from the Hopper single pass, written
    directly (``direct_dq_backward``) or summed with atomic adds in the fp32 scratch that
    ``_grad_q_accum_scratch`` allocates (``single_pass_backward``), or None: two passes. The one
    rule for the backward, which allocates the scratch, and ``memattn.explain``."""
    if direct_dq_backward(q, k, d, dv, attn_mask, key_padding_mask, is_causal, dropout_p, scale):
        return "direct"
    if single_pass_backward(q, d, dv, attn_mask, dropout_p, scale, mask_needs_grad):
        return "accumulated"
    return None


def _grad_q_accum_scratch(q: Tensor, d: int, dv: int) -> Tensor:
    """The single pass's fp32 dQ scratch (``dq_path`` "accumulated"): 64-row blocks of each
    (b, h) pair's queries, as many columns as the kernels' head-dim bucket."""
    B, Hq, Lq = q.shape[:3]
    columns = 64 if max(d, dv) <= 64 else 128 if max(d, dv) <= 128 else 256
    return q.new_empty((B * Hq * (-(-Lq // 64)) * 64 * columns,), dtype=torch.float32)


def _seed_value(dropout_seed: Tensor | None) -> int:
    return 0 if dropout_seed is None else int(dropout_seed.item())


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _forward_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    causal_alignment: str,
    dropout_p: float,
    dropout_seed: Tensor | None,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    """Runs the core's forward into freshly allocated ``out`` and ``lse`` (see module doc): the
    custom op ``memattn::attention_forward`` and the eager ``_EagerAttention`` both run it.

    ``attn_mask`` is already 4-D here; ``dropout_seed`` is an int64 CPU tensor of one element
    (or None without dropout) keying the Philox stream.
    """
    out = _empty_out(q, v)
    lse = _empty_lse(q)
    kq, kk, kv, kout = q.detach(), k.detach(), v.detach(), out
    if q.is_cuda:
        kq, kk, kv = _cuda_ready(kq), _cuda_ready(kk), _cuda_ready(kv)
        if kv.shape[-1] != v.shape[-1]:
            kout = _padded_like(out, kv.shape[-1])
    _memattn.forward(
        _dl(kq),
        _dl(kk),
        _dl(kv),
        _dl(kout),
        _dl(lse),
        _dl(_detached(attn_mask)),
        _dl(_detached(key_padding_mask)),
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        dropout_p=dropout_p,
        dropout_seed=_seed_value(dropout_seed),
        scale=_default_scale(q, scale),
        num_threads=torch.get_num_threads(),
        key_range_scratch=_dl(_key_range_scratch(q, key_padding_mask)),
        mask_block_scratch=_dl(_mask_block_scratch(q, k, attn_mask)),
        stream=_stream(q),
    )
    return _into(out, kout), lse


def _backward_impl(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    causal_alignment: str,
    dropout_p: float,
    dropout_seed: Tensor | None,
    scale: float | None,
    attn_mask_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the forward: ``(grad_q, grad_k, grad_v, grad_attn_mask)``; the custom op
    ``memattn::attention_backward`` and the eager ``_EagerAttention`` both run it.

    grad_q/k/v have q/k/v's shapes in q's dtype. ``grad_attn_mask`` has the 4-D mask's shape,
    in float32 (float64 for float64 q), when ``attn_mask_needs_grad``, else it is empty.
    """
    grad_q = torch.empty_like(q)
    grad_k = torch.empty_like(k)
    grad_v = torch.empty_like(v)
    mask_needs_grad = attn_mask_needs_grad and attn_mask is not None
    grad_mask = _empty_grad_mask(q, attn_mask, mask_needs_grad)
    tensors = [t.detach() for t in (grad_out, q, k, v, out)]
    grads = [grad_q, grad_k, grad_v]
    kernel_mask, kernel_grad_mask, scratch = _detached(attn_mask), grad_mask, None
    accum_scratch = step_scratch = None
    if q.is_cuda:
        tensors = [_cuda_ready(t) for t in tensors]
        grads = [
            g if t.shape[-1] == g.shape[-1] else _padded_like(g, t.shape[-1])
            for g, t in zip(grads, tensors[1:4], strict=True)
        ]
        B, Hq, Lq, _ = q.shape
        scratch = q.new_empty((B * Hq * Lq,), dtype=torch.float32)
        d, dv = tensors[1].shape[-1], tensors[3].shape[-1]
        path = dq_path(
            q, k, d, dv, attn_mask, key_padding_mask, is_causal, dropout_p, scale, mask_needs_grad
        )
        if path == "accumulated":
            accum_scratch = _grad_q_accum_scratch(q, d, dv)
            if attn_mask is not None:
                step_scratch = _mask_step_scratch(q, k, attn_mask)
        if mask_needs_grad:
            kernel_mask, kernel_grad_mask = _full_length_mask_grad(
                attn_mask, grad_mask, Lq, k.shape[2]
            )
    _memattn.backward(
        *(_dl(t) for t in tensors),
        _dl(lse.detach()),
        *(_dl(g) for g in grads),
        _dl(kernel_grad_mask) if mask_needs_grad else None,
        _dl(kernel_mask),
        _dl(_detached(key_padding_mask)),
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        dropout_p=dropout_p,
        dropout_seed=_seed_value(dropout_seed),
        scale=_default_scale(q, scale),
        num_threads=torch.get_num_threads(),
        grad_scratch=_dl(scratch),
        key_range_scratch=_dl(_key_range_scratch(q, key_padding_mask)),
        grad_q_accum_scratch=_dl(accum_scratch),
        mask_block_scratch=_dl(step_scratch),
        stream=_stream(q),
    )
    if mask_needs_grad and kernel_grad_mask is not grad_mask:
        grad_mask.copy_(_sum_to(kernel_grad_mask, grad_mask.shape))
    return _into(grad_q, grads[0]), _into(grad_k, grads[1]), _into(grad_v, grads[2]), grad_mask


# The ops run the implementations above; torch.library reads their schemas from the
# annotations and leaves the functions themselves as they are (the eager path calls them).
attention_forward = torch.library.custom_op("memattn::attention_forward", mutates_args=())(
    _forward_impl
)


@attention_forward.register_fake
def _attention_forward_fake(
    q,
    k,
    v,
    attn_mask,
    key_padding_mask,
    is_causal,
    causal_alignment,
    dropout_p,
    dropout_seed,
    scale,
):
    # Validating here makes a bad call fail while torch.compile traces, before anything runs.
    _validate(q, k, v, attn_mask, key_padding_mask, is_causal, causal_alignment, dropout_p, scale)
    return _empty_out(q, v), _empty_lse(q)


attention_backward = torch.library.custom_op("memattn::attention_backward", mutates_args=())(
    _backward_impl
)


@attention_backward.register_fake
def _attention_backward_fake(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    attn_mask,
    key_padding_mask,
    is_causal,
    causal_alignment,
    dropout_p,
    dropout_seed,
    scale,
    attn_mask_needs_grad,
):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        _empty_grad_mask(q, attn_mask, attn_mask_needs_grad),
    )


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, key_padding_mask, is_causal, causal_alignment, dropout_p, seed, scale) = (
        inputs
    )
    out, lse = output
    # Only out and lse besides the inputs: the backward recomputes the probabilities from lse.
    ctx.save_for_backward(q, k, v, attn_mask, key_padding_mask, seed, out, lse)
    ctx.options = (is_causal, causal_alignment, dropout_p, scale)
    ctx.mark_non_differentiable(lse)


def _input_gradients(ctx, grad_out: Tensor | None, run_backward) -> tuple:
    """The forward's input gradients from grad_out, computed by ``run_backward`` (the backward
    op, or its implementation in eager calls). grad_out is None only when out takes no part in
    the loss (lse is not differentiable): then no input gets a gradient."""
    if grad_out is None:
        return (None,) * 10
    q, k, v, attn_mask, key_padding_mask, seed, out, lse = ctx.saved_tensors
    is_causal, causal_alignment, dropout_p, scale = ctx.options
    mask_needs_grad = (
        attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[3]
    )
    grad_q, grad_k, grad_v, grad_mask = run_backward(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        attn_mask,
        key_padding_mask,
        is_causal,
        causal_alignment,
        dropout_p,
        seed,
        scale,
        mask_needs_grad,
    )
    needs = ctx.needs_input_grad
    return (
        grad_q if needs[0] else None,
        grad_k if needs[1] else None,
        grad_v if needs[2] else None,
        grad_mask.to(attn_mask.dtype) if mask_needs_grad else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _op_backward(ctx, grad_out, _grad_lse):
    return _input_gradients(ctx, grad_out, torch.ops.memattn.attention_backward)


attention_forward.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The forward op with its autograd formula as a plain autograd.Function, for eager calls.

    Same implementation functions and the same saved tensors as the custom ops, without
    torch.library's Python dispatch and autograd wrapping, which cost a tiny call more than
    the kernels (on CPU, 1x1x8x8 float32: 36 -> 13 us forward, 136 -> 39 us forward + backward
    with the capsule and stream changes). Gradients are not materialised: the non-differentiable
    lse gets no zero-filled gradient tensor.
    """

    # forward(ctx, ...) rather than a setup_context staticmethod: with one, Function.apply binds
    # its arguments through inspect.signature on every call (~20 us).
    @staticmethod
    def forward(ctx, *inputs):  # the forward op's arguments, in its order
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        # create_graph=True: the backward op, so that differentiating the gradients raises its
        # "no autograd formula" error instead of treating them as constants.
        run_backward = (
            torch.ops.memattn.attention_backward if torch.is_grad_enabled() else _backward_impl
        )
        return _input_gradients(ctx, grad_out, run_backward)


def _runs_eagerly(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a call may skip the custom op: plain CPU/CUDA tensors, nothing tracing or
    intercepting torch calls. Anything else (torch.compile, torch.jit.trace, make_fx and other
    dispatch modes, tensor subclasses, meta tensors, functorch transforms) sees the op."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if not all(type(t) is Tensor and t.device.type in ("cpu", "cuda") for t in (q, k, v)):
        return False
    # Private hooks (torch.autograd.Function reads the second itself), read defensively:
    # without them, the custom op is always the safe choice.
    dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
    transforms = getattr(torch._C, "_are_functorch_transforms_active", None)
    if dispatch_modes is None or transforms is None:
        return False
    return dispatch_modes() == 0 and not transforms()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    causal_alignment: str,
    dropout_p: float,
    dropout_seed: Tensor | None,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)``, differentiable in q, k, v and a float attn_mask: the custom op
    ``memattn::attention_forward``, or in plain eager calls the same computation without the
    op's dispatch (``_EagerAttention``). Arguments as the op's."""
    args = (
        q,
        k,
        v,
        attn_mask,
        key_padding_mask,
        is_causal,
        causal_alignment,
        dropout_p,
        dropout_seed,
        scale,
    )
    if _runs_eagerly(q, k, v):
        return _EagerAttention.apply(*args)
    return torch.ops.memattn.attention_forward(*args)
