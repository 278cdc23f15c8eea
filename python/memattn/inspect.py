"""``memattn.inspect(model, *args, **kwargs)``: runs one forward pass and records every attention
call: module path, self or cross, shapes, dtypes, masks, causality, and the backend that ran it
with the reason.

- Calls that run memattn (``memattn.nn.MultiheadAttention``, the Hugging Face "memattn"
  function) record the exact ``memattn.attention`` call and ``memattn.explain``'s plan for it.
- Other attention-like modules (``memattn.convert.is_attention_like``, innermost ones only) are
  recorded with their inputs, backend ``torch`` (or the transformers implementation) and why
  memattn does not run them.
- A ``torch.nn.TransformerEncoderLayer`` that takes torch's fused inference fast path never
  calls its ``self_attn``: that is recorded too, as what it is.

Recording neither registers module hooks nor changes modes, so the model takes the same paths it
would take without inspect (torch's fast path checks for hooks and would turn itself off).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from memattn import convert
from memattn import nn as mnn
from memattn.functional import explain

__all__ = ["AttentionCall", "InspectReport", "inspect"]


@dataclass
class AttentionCall:
    """One attention call seen during ``inspect``'s forward pass."""

    path: str
    module_type: str
    attention: str  # "self", "cross" or "?"
    q_shape: list | None
    k_shape: list | None
    v_shape: list | None
    dtype: str
    masks: str
    causal: str
    backend: str
    kernel: str
    reason: str
    note: str = ""
    inputs: str = ""  # for calls not run by memattn: the module's tensor inputs

    def to_dict(self) -> dict:
        return asdict(self)


class InspectReport:
    """The calls recorded by ``inspect`` (``calls``), and the model's ``output``.

    ``str()`` is a table; ``to_dict()`` is JSON-ready (without the output)."""

    def __init__(self, model_name: str, calls: list[AttentionCall], output: Any):
        self.model = model_name
        self.calls = calls
        self.output = output

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self):
        return iter(self.calls)

    def to_dict(self) -> dict:
        return {"model": self.model, "calls": [c.to_dict() for c in self.calls]}

    def __str__(self) -> str:
        on = sum(c.backend.startswith("memattn") for c in self.calls)
        lines = [
            f"attention calls in one forward of {self.model}: {len(self.calls)}, {on} ran memattn"
        ]
        header = ("#", "module", "attn", "q / k / v shapes", "dtype", "masks", "causal", "backend")
        rows = []
        for n, c in enumerate(self.calls):
            if c.q_shape is not None:
                shapes = f"{_dims(c.q_shape)} / {_dims(c.k_shape)} / {_dims(c.v_shape)}"
            else:
                shapes = c.inputs or "-"
            rows.append(
                (
                    str(n),
                    c.path or "<model>",
                    c.attention,
                    shapes,
                    c.dtype,
                    c.masks or "-",
                    c.causal,
                    c.kernel or c.backend or "none",
                )
            )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines.append(fmt.format(*header))
        lines.append("  ".join("-" * w for w in widths))
        for row, c in zip(rows, self.calls, strict=False):
            lines.append(fmt.format(*row).rstrip())
            why = c.reason + (f"; {c.note}" if c.note else "")
            lines.append(f"{'':<{widths[0]}}  why: {why}")
        return "\n".join(lines)


def _dims(shape) -> str:
    return "x".join(str(s) for s in shape) if shape is not None else "-"


def _describe(t: Any) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    if t.is_nested:
        return f"nested {str(t.dtype).removeprefix('torch.')}"
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


class _Tracer:
    """Collects calls; memattn's modules and functions report to it through
    ``memattn.nn._TRACER``."""

    def __init__(self, model: nn.Module):
        self.paths = {}
        for path, module in model.named_modules():
            self.paths.setdefault(id(module), path)
        self.calls: list[AttentionCall] = []
        self.stack: list[dict] = []  # open calls of wrapped modules

    def path_of(self, module: nn.Module) -> str:
        return self.paths.get(id(module), f"<{type(module).__name__} outside the model>")

    def _frame_of(self, module: nn.Module) -> dict | None:
        for frame in reversed(self.stack):
            if frame["module"] is module:
                return frame
        return None

    def record_memattn(self, module, q, k, v, kwargs, *, self_attention=None, note=""):
        """Called by memattn code right before it runs ``memattn.attention(q, k, v,
        **kwargs)`` for ``module``."""
        frame = self._frame_of(module)
        if frame is not None:
            frame["recorded"] = True
        if self_attention is None and frame is not None:
            self_attention = _self_attention_from_call(module, frame["args"], frame["kwargs"])
        if self_attention is None:
            cross = getattr(module, "is_cross_attention", None)
            self_attention = None if cross is None else not cross
        try:
            plan = explain(q, k, v, **kwargs)
            backend, kernel, reason = plan["backend"], plan["kernel"], plan["reason"]
            if not backend:
                reason = "; ".join(f"{b}: {', '.join(r)}" for b, r in plan["verdicts"] if r)
        except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
            backend, kernel, reason = "", "", f"invalid call: {type(e).__name__}: {e}"
        masks = []
        for name in ("attn_mask", "key_padding_mask"):
            t = kwargs.get(name)
            if t is not None:
                kind = "True = attend" if name == "attn_mask" and t.dtype == torch.bool else ""
                if name == "attn_mask" and t.is_floating_point():
                    kind = "added" + (", requires grad" if t.requires_grad else "")
                if name == "key_padding_mask":
                    kind = "True = padding"
                masks.append(f"{name} {_describe(t)} ({kind})")
        causal = "no"
        if kwargs.get("is_causal"):
            causal = kwargs.get("causal_alignment", "top_left")
        if kwargs.get("dropout_p"):
            note = (note + "; " if note else "") + f"dropout_p={kwargs['dropout_p']}"
        self.calls.append(
            AttentionCall(
                path=self.path_of(module),
                module_type=convert.type_name(type(module)),
                attention={True: "self", False: "cross", None: "?"}[self_attention],
                q_shape=list(q.shape),
                k_shape=list(k.shape),
                v_shape=list(v.shape),
                dtype=str(q.dtype).removeprefix("torch."),
                masks="; ".join(masks),
                causal=causal,
                backend=f"memattn/{backend}" if backend else "none",
                kernel=kernel,
                reason=reason,
                note=note,
            )
        )

    def record_other(
        self,
        module,
        args,
        kwargs,
        *,
        backend: str,
        reason: str,
        note: str = "",
        self_attention=None,
    ):
        names = _argument_names(module)
        tensors = [
            (names[n] if n < len(names) else f"arg{n}", a)
            for n, a in enumerate(args)
            if isinstance(a, Tensor)
        ]
        tensors += [(k, a) for k, a in kwargs.items() if isinstance(a, Tensor)]
        masks = [f"{k} {_describe(a)}" for k, a in tensors if "mask" in k or "bias" in k]
        inputs = "; ".join(f"{k}: {_describe(a)}" for k, a in tensors if "mask" not in k)
        first = next((a for _, a in tensors), None)
        dtype = str(first.dtype).removeprefix("torch.") if first is not None else "-"
        causal = kwargs.get("is_causal", kwargs.get("src_is_causal"))
        if self_attention is None:
            self_attention = _self_attention_from_call(module, args, kwargs)
        self.calls.append(
            AttentionCall(
                path=self.path_of(module),
                module_type=convert.type_name(type(module)),
                attention={True: "self", False: "cross", None: "?"}[self_attention],
                q_shape=None,
                k_shape=None,
                v_shape=None,
                dtype=dtype,
                masks="; ".join(masks),
                causal="hint" if causal else "no",
                backend=backend,
                kernel="",
                reason=reason,
                note=note,
                inputs=inputs[:200],
            )
        )


def _argument_names(module: nn.Module) -> list[str]:
    import inspect as _pyinspect

    try:
        params = _pyinspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return []
    return [n for n in params if n != "self"]


def _self_attention_from_call(module, args, kwargs) -> bool | None:
    """Self- or cross-attention, judged from how the module was called."""
    if isinstance(module, nn.MultiheadAttention):
        qkv = list(args[:3]) + [kwargs.get(n) for n in ("query", "key", "value")[len(args) :]]
        if len(qkv) >= 2 and qkv[0] is not None and qkv[1] is not None:
            return qkv[0] is qkv[1]
        return None
    names = _argument_names(module)
    for name in ("key_value_states", "encoder_hidden_states", "cross_attention_states"):
        if name in kwargs:
            return kwargs[name] is None
        if name in names:
            position = names.index(name)
            return position >= len(args) or args[position] is None
    if isinstance(module, nn.TransformerEncoderLayer):
        return True
    cross = getattr(module, "is_cross_attention", None)
    return None if cross is None else not cross


def _innermost_attention(model: nn.Module) -> list[nn.Module]:
    """Attention-like modules with no attention-like module inside them (HF's BertAttention
    holds BertSelfAttention: only the latter is recorded)."""
    out = []
    for module in model.modules():
        if not convert.is_attention_like(module) or isinstance(module, mnn.MultiheadAttention):
            continue
        inner = any(convert.is_attention_like(m) for m in module.modules() if m is not module)
        if not inner:
            out.append(module)
    return out


def inspect(model: nn.Module, *args: Any, **kwargs: Any) -> InspectReport:
    """Runs ``model(*args, **kwargs)`` once and returns the attention calls it made.

    The model runs as it is (its mode, its autograd state); nothing is converted. The report's
    ``output`` is what the model returned. See the module docstring for what is recorded.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    tracer = _Tracer(model)
    wrapped: list[tuple[nn.Module, Any]] = []

    def wrap(module: nn.Module, after) -> None:
        # An instance attribute shadows the class's forward for this call only; unlike a
        # hook it does not turn torch's fast paths off.
        had = module.__dict__.get("forward", _MISSING)
        inner = module.forward

        def forward(*a, **kw):
            frame = {
                "module": module,
                "args": a,
                "kwargs": kw,
                "recorded": False,
                "n_before": len(tracer.calls),
            }
            tracer.stack.append(frame)
            try:
                return inner(*a, **kw)
            finally:
                tracer.stack.pop()
                after(module, frame)

        module.__dict__["forward"] = forward
        wrapped.append((module, had))

    def after_attention(module, frame):
        if frame["recorded"]:
            return
        backend, reason = _other_backend(module)
        tracer.record_other(module, frame["args"], frame["kwargs"], backend=backend, reason=reason)

    def after_encoder_layer(module, frame):
        attn = module.self_attn
        if any(c.path == tracer.path_of(attn) for c in tracer.calls[frame["n_before"] :]):
            return
        tracer.record_other(
            attn,
            frame["args"],
            frame["kwargs"],
            backend="torch fused encoder-layer fast path",
            self_attention=True,
            reason=(
                "torch.nn.TransformerEncoderLayer in eval without autograd called "
                "torch._transformer_encoder_layer_fwd with self_attn's weights and never called "
                "self_attn (it materialises the Lq x Lk scores); memattn.optimize(model) "
                "converts the layer so that memattn runs"
            ),
        )

    for module in _innermost_attention(model):
        wrap(module, after_attention)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and not isinstance(
            module, mnn.TransformerEncoderLayer
        ):
            wrap(module, after_encoder_layer)
    token = mnn._TRACER.set(tracer)
    try:
        output = model(*args, **kwargs)
    finally:
        mnn._TRACER.reset(token)
        for module, had in reversed(wrapped):
            if had is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = had
    return InspectReport(type(model).__name__, tracer.calls, output)


_MISSING = object()


def _other_backend(module: nn.Module) -> tuple[str, str]:
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl:
        backend = f"transformers {impl}"
    else:
        backend = "torch"
    st = convert.status(module)
    reasons = [r for row in st.rows for r in row.reasons]
    why = reasons[0] if reasons else "not converted"
    if impl and impl != "memattn":
        why = f"attn_implementation={impl!r}; " + why
    return backend, why
