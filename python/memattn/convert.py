"""The model converter: ``optimize``, ``restore``, ``status`` (``inspect`` is in memattn.inspect).

``optimize(model)`` replaces, in place, every attention module of ``model`` that an adapter can
prove it handles, and the containers around them whose fused fast paths would bypass them:

- ``torch.nn.MultiheadAttention`` and its subclasses (e.g. a hand-written "memory-efficient"
  wrapper that only supports self-attention) become ``memattn.nn.MultiheadAttention``;
- other modules with nn.MHA's layout (``embed_dim``, ``num_heads``, ``in_proj_weight`` or
  ``q/k/v_proj_weight``, ``out_proj``, optionally ``in_proj_bias``, ``bias_k``/``bias_v``) and
  nn.MHA's forward become ``memattn.nn.MultiheadAttention`` when verification proves it;
- ``torch.nn.TransformerEncoderLayer`` / ``TransformerEncoder`` around converted attention
  become memattn's subclasses, which never take torch's fused inference fast path (in eval
  under no_grad torch would call ``torch._transformer_encoder_layer_fwd`` with the weights and
  never call ``self_attn``, or pack the batch into nested tensors);
- a Hugging Face ``PreTrainedModel`` whose attention goes through transformers'
  ``AttentionInterface`` is switched to ``attn_implementation="memattn"``.

Guarantees:

- **Weights**: parameters are never copied: the converted module holds the very same
  ``Parameter`` objects (bit-exact by construction; optimizers keep working; no extra memory),
  after a strict check that the module's parameter and buffer names and shapes are exactly
  nn.MHA's for its configuration. ``state_dict`` keys are unchanged, so checkpoints load into
  the converted and the original model alike.
- **Verification** (``verify=True``): before committing, each converted module is run on small
  probe inputs and compared with the original module's own output (in eval mode, without
  gradients). ``probe=`` adds an end-to-end comparison of the whole model.
- **Atomic**: on any failure the model is left exactly as it was and ``ConversionError`` names
  the module path and the reason.
- **Idempotent**: converted modules are recognised and left alone.
- ``restore(model)`` gives back the original classes (and objects), with the current weights.

Custom attention modules: write an ``Adapter`` and ``register_adapter`` it.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from memattn import nn as mnn

__all__ = [
    "Adapter",
    "ConversionError",
    "Probe",
    "Status",
    "adapters",
    "is_attention_like",
    "optimize",
    "register_adapter",
    "restore",
    "status",
]

_ORIGIN_ATTR = "_memattn_origin"
_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)


class ConversionError(RuntimeError):
    """``optimize`` could not convert a module; the model is unchanged.

    ``path`` is the module's path in the model (``""`` for the model itself) and ``reason`` says
    why.
    """

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        where = f"module {path!r}" if path else "the model"
        super().__init__(f"memattn.optimize: {where}: {reason}. The model was left unchanged.")


@dataclass
class Probe:
    """One verification call: ``module(*args, **kwargs)``, described in a few words."""

    args: tuple
    kwargs: dict
    description: str
    # Optional bool tensor broadcastable to the first output: where to compare (True). For
    # outputs whose padded positions are unspecified (torch's nested fast path gives 0 there).
    compare_where: Tensor | None = None


@dataclass
class Origin:
    """What a converted module was, kept on it (not in its state_dict) for ``restore``."""

    adapter: str
    cls: type
    module: nn.Module | None = None  # the original object, when the adapter replaced it
    verification: str = ""


def type_name(cls: type) -> str:
    """``torch.nn.MultiheadAttention`` rather than ``torch.nn.modules.activation....``."""
    if cls.__module__.startswith("torch.nn.modules") and getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def origin_of(module: nn.Module) -> Origin | None:
    return module.__dict__.get(_ORIGIN_ATTR)


def _set_origin(module: nn.Module, origin: Origin | None) -> None:
    if origin is None:
        module.__dict__.pop(_ORIGIN_ATTR, None)
    else:
        module.__dict__[_ORIGIN_ATTR] = origin


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------


class Adapter:
    """How to convert one kind of module. Subclass, then ``register_adapter(MyAdapter())``.

    - ``kind``: ``"attention"`` (an attention module) or ``"container"`` (a module holding
      converted attention whose own code would bypass it, e.g. a fused fast path).
    - ``matches(module)``: is this adapter responsible for the module (a cheap type test)?
    - ``check(module)``: ``None`` if it can convert it, else the reason it can't (the module is
      then left alone and ``status`` shows the reason).
    - ``convert(module)``: the replacement (the same object after an in-place class change, or
      a new module sharing the parameters).
    - ``restore(module, origin)``: the original module back.
    - ``probes(module)``: inputs to verify the conversion on (empty: not verified).
    - ``reference(module, probe)``: the expected output, computed on the original module
      before conversion; by default the module's own forward.
    """

    name = "adapter"
    kind = "attention"

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, module: nn.Module) -> str | None:
        return None

    def convert(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def restore(self, module: nn.Module, origin: Origin) -> nn.Module:
        raise NotImplementedError

    def probes(self, module: nn.Module) -> list[Probe]:
        return []

    def reference(self, module: nn.Module, probe: Probe) -> tuple[Any, str]:
        """``(expected output, note)``; raises if no reference can be had for this probe."""
        return module(*probe.args, **probe.kwargs), ""


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter, *, first: bool = True) -> Adapter:
    """Adds an adapter; ``first=True`` puts it before the built-in ones (it wins ties)."""
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"adapter: expected a memattn.convert.Adapter, got {type(adapter).__name__}"
        )
    if adapter.kind not in ("attention", "container"):
        raise ValueError(f"adapter.kind: expected 'attention' or 'container', got {adapter.kind!r}")
    if first:
        _ADAPTERS.insert(0, adapter)
    else:
        _ADAPTERS.append(adapter)
    return adapter


def adapters() -> list[Adapter]:
    """The registered adapters, in the order they are tried."""
    return list(_ADAPTERS)


def _adapter_for(module: nn.Module, kind: str | None = None) -> Adapter | None:
    for adapter in _ADAPTERS:
        if (kind is None or adapter.kind == kind) and adapter.matches(module):
            return adapter
    return None


def _adapter_named(name: str) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.name == name:
            return adapter
    raise ConversionError("", f"no adapter named {name!r} is registered (it converted a module)")


def _first_param(module: nn.Module) -> Tensor:
    for p in module.parameters():
        return p
    raise ValueError("module has no parameters")


def _expected_mha_state(module: nn.Module, config: dict) -> dict[str, tuple]:
    """Names and shapes of nn.MHA's parameters for ``config``, built on the meta device."""
    ref = torch.nn.MultiheadAttention(**config, device="meta")
    return {name: tuple(t.shape) for name, t in ref.state_dict(keep_vars=True).items()}


def _strict_state_check(module: nn.Module, config: dict) -> str | None:
    """None when the module's parameters and buffers are exactly nn.MHA's for ``config``."""
    try:
        want = _expected_mha_state(module, config)
    except (AssertionError, ValueError, TypeError) as e:
        return f"its attributes give no valid nn.MultiheadAttention configuration ({e})"
    have = {name: tuple(t.shape) for name, t in module.state_dict(keep_vars=True).items()}
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    if extra:
        return (
            f"it has parameters or buffers nn.MultiheadAttention does not have: {extra} "
            "(memattn can't know what its forward does with them)"
        )
    if missing:
        return f"it lacks nn.MultiheadAttention parameters {missing}"
    wrong = [f"{n}: {have[n]} != {want[n]}" for n in sorted(want) if have[n] != want[n]]
    if wrong:
        return f"parameter shapes differ from nn.MultiheadAttention's: {wrong}"
    tensors = list(module.state_dict(keep_vars=True).values())
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        return "its parameters do not share one dtype and device"
    return None


def backend_reason(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> str | None:
    """None when memattn has a backend for ``dtype`` on ``device``, else why not (from
    ``memattn.explain`` on a tiny call)."""
    from memattn.functional import explain

    q = torch.zeros(1, 1, 1, head_dim, device=device, dtype=dtype)
    try:
        plan = explain(q, q, q)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        return f"memattn can't run {dtype} on {device}: {e}"
    if plan["backend"]:
        return None
    reasons = [f"{backend}: {'; '.join(why)}" for backend, why in plan["verdicts"] if why]
    return f"memattn has no backend for {dtype} on {device.type} ({' | '.join(reasons)})"


def _backend_check(module: nn.Module) -> str | None:
    p = _first_param(module)
    head_dim = max(1, int(module.embed_dim) // max(1, int(module.num_heads)))
    return backend_reason(p.device, p.dtype, head_dim)


def _mha_config(module: nn.Module) -> dict:
    """nn.MHA constructor arguments read off a module with nn.MHA's attributes."""
    bias = getattr(module, "in_proj_bias", None) is not None
    kdim = getattr(module, "kdim", None)
    vdim = getattr(module, "vdim", None)
    if getattr(module, "k_proj_weight", None) is not None:
        kdim = module.k_proj_weight.shape[1]
        vdim = module.v_proj_weight.shape[1]
    return {
        "embed_dim": int(module.embed_dim),
        "num_heads": int(module.num_heads),
        "dropout": float(getattr(module, "dropout", 0.0)),
        "bias": bias,
        "add_bias_kv": getattr(module, "bias_k", None) is not None,
        "add_zero_attn": bool(getattr(module, "add_zero_attn", False)),
        "kdim": kdim,
        "vdim": vdim,
        "batch_first": bool(getattr(module, "batch_first", False)),
    }


def _mha_probes(module: nn.Module) -> list[Probe]:
    """Self- and cross-attention probes with every mask kind nn.MHA takes (no fully masked
    row: torch gives NaN there, memattn 0)."""
    config = _mha_config(module)
    E, kdim, vdim = config["embed_dim"], config["kdim"] or config["embed_dim"], config["vdim"]
    vdim = vdim or E
    p = _first_param(module)
    gen = torch.Generator().manual_seed(1234)
    B, Lq, Lk = 2, 5, 7

    def x(L: int, d: int) -> Tensor:
        shape = (B, L, d) if config["batch_first"] else (L, B, d)
        return torch.randn(shape, generator=gen).to(device=p.device, dtype=p.dtype)

    kpm = torch.zeros(B, Lk, dtype=torch.bool, device=p.device)
    kpm[1, 4:] = True
    kpm_self = kpm[:, :Lq]
    i = torch.arange(Lq, device=p.device).unsqueeze(1)
    j = torch.arange(Lk, device=p.device).unsqueeze(0)
    bool_mask = j > i + 1  # True = masked out (nn.MHA), never a whole row
    float_mask = (0.5 * torch.randn(Lq, Lk, generator=gen)).to(device=p.device, dtype=p.dtype)
    probes = []
    if kdim == E and vdim == E:
        s = x(Lq, E)
        probes.append(Probe((s, s, s), {"need_weights": False}, "self-attention"))
        probes.append(
            Probe(
                (s, s, s),
                {"key_padding_mask": kpm_self, "need_weights": True},
                "self-attention, bool key_padding_mask, weights",
            )
        )
    q, k, v = x(Lq, E), x(Lk, kdim), x(Lk, vdim)
    probes.append(
        Probe((q, k, v), {"attn_mask": float_mask, "need_weights": False}, "cross, float mask")
    )
    probes.append(
        Probe(
            (q, k, v),
            {
                "attn_mask": bool_mask,
                "key_padding_mask": kpm,
                "need_weights": True,
                "average_attn_weights": False,
            },
            "cross, bool attn_mask and key_padding_mask, per-head weights",
        )
    )
    return probes


class MultiheadAttentionAdapter(Adapter):
    """``torch.nn.MultiheadAttention`` and subclasses -> ``memattn.nn.MultiheadAttention``.

    In place: the module's class changes, its parameters, buffers and hooks stay. A subclass's
    own forward is replaced; verification compares against it on the probes it accepts and
    against nn.MultiheadAttention's forward on the ones it refuses (raises for).
    """

    name = "torch.nn.MultiheadAttention"
    kind = "attention"

    def matches(self, module):
        return isinstance(module, nn.MultiheadAttention) and not isinstance(
            module, mnn.MultiheadAttention
        )

    def check(self, module):
        return _strict_state_check(module, _mha_config(module)) or _backend_check(module)

    def convert(self, module):
        module.__class__ = mnn.MultiheadAttention
        return module

    def restore(self, module, origin):
        module.__class__ = origin.cls
        return module

    def probes(self, module):
        return _mha_probes(module)

    def reference(self, module, probe):
        try:
            return module(*probe.args, **probe.kwargs), ""
        except Exception as e:
            if type(module).forward is nn.MultiheadAttention.forward:
                raise
            note = (
                f"{type(module).__name__}.forward refused '{probe.description}' "
                f"({type(e).__name__}: {str(e)[:80]}); compared with "
                "torch.nn.MultiheadAttention.forward"
            )
            return nn.MultiheadAttention.forward(module, *probe.args, **probe.kwargs), note


class MHALayoutAdapter(Adapter):
    """Modules that are not nn.MHA but have its layout and forward (e.g. a vendored copy of
    nn.MultiheadAttention): replaced by a ``memattn.nn.MultiheadAttention`` that shares their
    parameters (and their ``out_proj`` module). Proven by verification: the module's own
    forward must accept the probes (called like nn.MHA) and match."""

    name = "nn.MultiheadAttention layout"
    kind = "attention"

    def matches(self, module):
        if isinstance(module, nn.MultiheadAttention):
            return False
        if not isinstance(getattr(module, "embed_dim", None), int):
            return False
        if not isinstance(getattr(module, "num_heads", None), int):
            return False
        out_proj = getattr(module, "out_proj", None)
        if not isinstance(out_proj, nn.Module) or not isinstance(
            getattr(out_proj, "weight", None), Tensor
        ):
            return False
        packed = isinstance(getattr(module, "in_proj_weight", None), nn.Parameter)
        separate = all(
            isinstance(getattr(module, n, None), nn.Parameter)
            for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        )
        return packed or separate

    def check(self, module):
        why = _strict_state_check(module, _mha_config(module))
        if why:
            return why
        if any(len(list(m.children())) for m in module.out_proj.modules()):
            return "its out_proj has submodules"
        return _backend_check(module)

    def convert(self, module):
        config = _mha_config(module)
        p = _first_param(module)
        new = mnn.MultiheadAttention(**config, device="meta", dtype=p.dtype)
        for name in list(new._parameters):
            new._parameters[name] = module._parameters.get(name)
        new._modules["out_proj"] = module.out_proj
        new.train(module.training)
        return new

    def restore(self, module, origin):
        original = origin.module
        for name, param in module._parameters.items():
            if name in original._parameters:
                original._parameters[name] = param
        original._modules["out_proj"] = module.out_proj
        original.train(module.training)
        return original

    def probes(self, module):
        return _mha_probes(module)


class _ClassSwapAdapter(Adapter):
    """Converts a torch container in place by swapping its class for a memattn subclass of it
    (a user subclass keeps its own methods and gets memattn's forward under them)."""

    kind = "container"
    torch_cls: type
    memattn_cls: type

    def matches(self, module):
        return isinstance(module, self.torch_cls) and not isinstance(module, self.memattn_cls)

    def convert(self, module):
        module.__class__ = _memattn_subclass(type(module), self.memattn_cls)
        return module

    def restore(self, module, origin):
        module.__class__ = origin.cls
        return module


class EncoderLayerAdapter(_ClassSwapAdapter):
    """``torch.nn.TransformerEncoderLayer`` (and subclasses) whose ``self_attn`` is memattn's
    -> ``memattn.nn.TransformerEncoderLayer`` (in place; a subclass keeps its own methods and
    gets memattn's forward under it, so ``super().forward`` reaches memattn's)."""

    name = "torch.nn.TransformerEncoderLayer"
    torch_cls = nn.TransformerEncoderLayer
    memattn_cls = mnn.TransformerEncoderLayer

    def check(self, module):
        if not isinstance(module.self_attn, mnn.MultiheadAttention):
            return "its self_attn is not converted, so there is nothing to route to memattn"
        return None

    def probes(self, module):
        attn = module.self_attn
        p = _first_param(module)
        gen = torch.Generator().manual_seed(4321)
        B, L, E = 2, 6, attn.embed_dim
        shape = (B, L, E) if attn.batch_first else (L, B, E)
        src = torch.randn(shape, generator=gen).to(device=p.device, dtype=p.dtype)
        kpm = torch.zeros(B, L, dtype=torch.bool, device=p.device)
        kpm[1, 4:] = True
        causal = nn.Transformer.generate_square_subsequent_mask(L, device=p.device, dtype=p.dtype)
        return [
            Probe((src,), {}, "no mask"),
            Probe((src,), {"src_key_padding_mask": kpm}, "bool src_key_padding_mask"),
            Probe((src,), {"src_mask": causal, "is_causal": True}, "causal src_mask"),
        ]


class EncoderAdapter(_ClassSwapAdapter):
    """``torch.nn.TransformerEncoder`` whose layers are memattn's -> ``memattn.nn.
    TransformerEncoder`` (in place): no nested-tensor conversion of padded batches."""

    name = "torch.nn.TransformerEncoder"
    torch_cls = nn.TransformerEncoder
    memattn_cls = mnn.TransformerEncoder

    def check(self, module):
        if not all(isinstance(layer, mnn.TransformerEncoderLayer) for layer in module.layers):
            return "not all of its layers are converted"
        return None

    def probes(self, module):
        plain, padded = EncoderLayerAdapter().probes(module.layers[0])[:2]
        kpm = padded.kwargs["src_key_padding_mask"]
        # Torch's nested path leaves padded positions 0 (then the final norm); compare only
        # the real tokens there.
        valid = ~kpm if module.layers[0].self_attn.batch_first else ~kpm.transpose(0, 1)
        return [
            Probe(plain.args, {}, plain.description),
            Probe(padded.args, dict(padded.kwargs), padded.description, valid.unsqueeze(-1)),
        ]


_SUBCLASS_CACHE: dict[tuple[type, type], type] = {}


def _memattn_subclass(cls: type, memattn_cls: type) -> type:
    """``memattn_cls`` for torch's own class; for a user subclass of torch's class, a class
    whose method resolution order is (user class, memattn class, torch class): the user's
    methods win and their ``super()`` calls reach memattn's."""
    if cls in (memattn_cls.__bases__[0],):
        return memattn_cls
    key = (cls, memattn_cls)
    if key not in _SUBCLASS_CACHE:
        _SUBCLASS_CACHE[key] = type(
            f"Memattn{cls.__name__}", (cls, memattn_cls), {"__module__": cls.__module__}
        )
    return _SUBCLASS_CACHE[key]


for _adapter in (
    MultiheadAttentionAdapter(),
    MHALayoutAdapter(),
    EncoderLayerAdapter(),
    EncoderAdapter(),
):
    register_adapter(_adapter, first=False)


# --------------------------------------------------------------------------------------------
# Hugging Face models (model-level: attn_implementation)
# --------------------------------------------------------------------------------------------


def _hf():
    """memattn.integrations.hf when transformers is already imported (never imports it)."""
    if "transformers" not in sys.modules:
        return None
    from memattn.integrations import hf

    return hf


# --------------------------------------------------------------------------------------------
# optimize / restore
# --------------------------------------------------------------------------------------------

_TOLERANCE = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def _tensors(x: Any) -> list[Tensor | None]:
    """The tensors of a (nested) output, in order; None kept so structures must agree."""
    if x is None:
        return [None]
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for key in x for t in _tensors(x[key])]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    if hasattr(x, "to_tuple"):  # transformers' ModelOutput
        return _tensors(x.to_tuple())
    return []


def _compare(
    got: Any, want: Any, factor: float = 1.0, where: Tensor | None = None
) -> tuple[float, str | None]:
    """(max abs error, None) or (err, why they differ). ``where`` limits the comparison of the
    first output to those positions."""
    g, w = _tensors(got), _tensors(want)
    if len(g) != len(w):
        return float("inf"), f"output structure differs ({len(g)} tensors vs {len(w)})"
    worst = 0.0
    for n, (a, b) in enumerate(zip(g, w, strict=False)):
        if a is None or b is None:
            if (a is None) != (b is None):
                return float("inf"), f"output {n} is None in one and not in the other"
            continue
        if a.is_nested or b.is_nested:
            a = a.to_padded_tensor(0.0) if a.is_nested else a
            b = b.to_padded_tensor(0.0) if b.is_nested else b
        if a.shape != b.shape:
            return float("inf"), f"output {n} has shape {list(a.shape)}, expected {list(b.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return float("inf"), f"output {n} (not floating point) differs"
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        finite = torch.isfinite(b64)
        if n == 0 and where is not None:
            finite = finite & where.expand_as(finite)
        if not torch.isfinite(a64[finite]).all():
            return float("inf"), f"output {n} has NaN or inf where the original is finite"
        err = (a64[finite] - b64[finite]).abs().max().item() if finite.any() else 0.0
        atol, rtol = _TOLERANCE.get(b.dtype, (1e-3, 1e-3))
        scale = max(1.0, b64[finite].abs().max().item()) if finite.any() else 1.0
        tol = factor * (atol + rtol * scale)
        worst = max(worst, err)
        if err > tol:
            return err, f"output {n} differs by {err:.3e} (tolerance {tol:.3e} for {b.dtype})"
    return worst, None


class _Holder(nn.Module):
    """A parent for the model while it is converted (so the root can be replaced too)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._modules["model"] = model

    @property
    def model(self) -> nn.Module:
        return self._modules["model"]


class _EvalNoGrad:
    """Eval mode (flags restored per module afterwards) and no autograd, for verification."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.train(False)
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return self

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag
        return False


@dataclass
class _Item:
    path: str
    module: nn.Module
    adapter: Adapter
    probes: list[Probe] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    converted: nn.Module | None = None


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(child) -> every (parent, attribute name) that holds it (a module may be shared)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, name))
    return out


def _swap(parents: dict, old: nn.Module, new: nn.Module) -> None:
    if new is old:
        return
    for parent, name in parents.get(id(old), []):
        parent._modules[name] = new
    parents[id(new)] = parents.pop(id(old), [])


def _selected(path: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> bool:
    def hit(patterns):
        return any(path == p or path.startswith(p + ".") or re.fullmatch(p, path) for p in patterns)

    if include is not None and not hit(include):
        return False
    return not (exclude is not None and hit(exclude))


def _plan(model, include, exclude) -> tuple[list[_Item], list[tuple[str, nn.Module, str]]]:
    """Attention items, then container items whose attention is (or will be) memattn; plus
    the modules left alone with the reason."""
    items: list[_Item] = []
    skipped: list[tuple[str, nn.Module, str]] = []
    seen: set[int] = set()
    named = [
        (path.removeprefix("model").removeprefix("."), module)
        for path, module in model.named_modules()
        if module is not model
    ]
    planned_attention: set[int] = set()
    for path, module in named:
        if id(module) in seen or origin_of(module) is not None:
            continue
        seen.add(id(module))
        adapter = _adapter_for(module, "attention")
        if adapter is None:
            continue
        if not _selected(path, include, exclude):
            skipped.append((path, module, "excluded by include/exclude"))
            continue
        why = adapter.check(module)
        if why:
            skipped.append((path, module, why))
            continue
        items.append(_Item(path, module, adapter))
        planned_attention.add(id(module))
    # Containers are checked as if their planned attention were already converted.
    for path, module in named:
        adapter = _adapter_for(module, "container")
        if (
            adapter is None
            or origin_of(module) is not None
            or not _selected(path, include, exclude)
        ):
            continue
        why = _container_check(module, adapter, planned_attention)
        if why:
            skipped.append((path, module, why))
            continue
        items.append(_Item(path, module, adapter))
    return items, skipped


def _container_check(module, adapter, planned: set[int]) -> str | None:
    if isinstance(module, nn.TransformerEncoderLayer):
        ok = isinstance(module.self_attn, mnn.MultiheadAttention) or id(module.self_attn) in planned
        return None if ok else "its self_attn is not converted, so it keeps torch's fast path"
    if isinstance(module, nn.TransformerEncoder):
        layers_ok = all(
            isinstance(layer, nn.TransformerEncoderLayer)
            and _container_check(layer, adapter, planned) is None
            for layer in module.layers
        )
        return None if layers_ok else "not all of its layers can be converted"
    return adapter.check(module)


def optimize(
    model: nn.Module,
    *,
    verify: bool = True,
    probe: Any = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    strict: bool = False,
    hf: bool = True,
) -> nn.Module:
    """Converts ``model``'s attention to memattn, in place, and returns ``model``.

    Args:
        model: any ``torch.nn.Module`` (a bare ``torch.nn.MultiheadAttention`` included).
        verify: before committing, run every module to convert on probe inputs, original and
            converted, and compare (eval mode, no autograd; the model's modes are restored
            afterwards). A module whose own forward refuses every probe (it is not called
            like nn.MultiheadAttention) is not converted; a mismatch makes the whole call fail
            with ``ConversionError`` and the model unchanged. ``verify=False`` converts
            whatever the adapters accept, unverified.
        probe: optional example input for an end-to-end check of the whole model: a tensor, a
            tuple of positional arguments, or a dict of keyword arguments. The converted
            model's output must match the original's; if the original raises on it (e.g. a
            wrapper that refuses masks), the converted model must run and give finite values.
            A Hugging Face model's switch is only verified this way.
        include / exclude: module paths (a path selects its submodules too; regular
            expressions allowed) to limit the conversion to.
        strict: raise ``ConversionError`` when an attention-like module that an adapter
            recognises can't be converted, instead of leaving it alone with a warning
            (``status`` lists the reasons either way).
        hf: switch a Hugging Face ``PreTrainedModel`` (transformers already imported) to
            ``attn_implementation="memattn"``.

    Calling it again converts only what is new (idempotent). ``restore(model)`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    hf_mod = _hf() if hf else None
    # The model is held by a throwaway parent so that the model itself (e.g. a bare
    # nn.MultiheadAttention) can be replaced like any submodule.
    holder = _Holder(model)
    items, skipped = _plan(holder, include, exclude)
    hf_switch = False
    if hf_mod is not None and hf_mod.is_hf_model(model):
        why = hf_mod.check(model)
        if why is not None:
            skipped.append(("", model, why))
        elif model.config._attn_implementation != hf_mod.NAME and _selected("", include, exclude):
            hf_switch = True

    end_to_end_ref = None
    end_to_end_note = ""
    if verify:
        items = _references(items, skipped)
        if probe is not None:
            with _EvalNoGrad(model):
                try:
                    end_to_end_ref = _call(model, probe)
                except Exception as e:  # noqa: BLE001 - the origin scenario: it crashed before
                    end_to_end_ref = _NO_REFERENCE
                    end_to_end_note = (
                        f"the original model raised {type(e).__name__} on the probe "
                        f"({str(e)[:100]}); the converted model was checked to run"
                    )
    _report_skipped(skipped, strict)

    current = ""

    parents = _parents(holder)
    applied: list[_Item] = []
    hf_previous = None
    try:
        for item in items:
            current = item.path
            cls = type(item.module)
            new = item.adapter.convert(item.module)
            item.converted = new
            applied.append(item)
            original = item.module if new is not item.module else None
            _set_origin(new, Origin(item.adapter.name, cls, original))
            _swap(parents, item.module, new)
        if hf_switch:
            current = ""
            hf_previous = hf_mod.enable(model)
        for item in applied:
            current = item.path
            origin_of(item.converted).verification = (
                _verify_item(item) if verify else "not verified (verify=False)"
            )
        if verify and probe is not None:
            current = ""
            with _EvalNoGrad(model):
                got = _call(model, probe)
            if end_to_end_ref is _NO_REFERENCE:
                _check_finite(got, "probe")
            else:
                _, why = _compare(got, end_to_end_ref, factor=10.0)
                if why:
                    raise _VerifyError(f"end-to-end verification on probe failed: {why}")
    except BaseException as e:
        if hf_previous is not None:
            hf_mod.disable(model, hf_previous)
        for item in reversed(applied):
            original = item.adapter.restore(item.converted, origin_of(item.converted))
            _set_origin(item.converted, None)
            _swap(parents, item.converted, original)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        reason = str(e) if isinstance(e, _VerifyError) else f"{type(e).__name__}: {e}"
        raise ConversionError(current, reason) from e
    if hf_previous is not None:
        model.__dict__["_memattn_hf_previous"] = hf_previous
        if end_to_end_note:
            model.__dict__["_memattn_hf_note"] = end_to_end_note
    return holder.model


def _references(items: list[_Item], skipped: list) -> list[_Item]:
    """Computes each item's probes and reference outputs on the original module. Attention
    modules whose forward refuses every probe move to ``skipped``; so do containers whose
    attention is no longer planned."""
    kept = []
    for item in items:
        if item.adapter.kind == "container":
            planned = {id(i.module) for i in kept if i.adapter.kind == "attention"}
            why = _container_check(item.module, item.adapter, planned)
            if why:
                skipped.append((item.path, item.module, why))
                continue
        try:
            item.probes = item.adapter.probes(item.module)
        except Exception as e:  # noqa: BLE001 - an adapter that can't build probes can't prove it
            skipped.append((item.path, item.module, f"no probe inputs: {type(e).__name__}: {e}"))
            continue
        refused = []
        with _EvalNoGrad(item.module):
            for pr in item.probes:
                try:
                    ref, note = item.adapter.reference(item.module, pr)
                except Exception as e:  # noqa: BLE001 - a refused probe is reported, not fatal
                    refused.append(f"'{pr.description}': {type(e).__name__}: {str(e)[:80]}")
                    ref, note = _NO_REFERENCE, ""
                item.references.append(ref)
                if note:
                    item.notes.append(note)
        if refused and item.adapter.kind == "attention" and len(refused) == len(item.probes):
            skipped.append(
                (
                    item.path,
                    item.module,
                    "its forward refused every verification probe (called like "
                    f"nn.MultiheadAttention): {refused[0]}",
                )
            )
            continue
        if refused:
            what = "compared" if item.adapter.kind == "attention" else "checked to run"
            item.notes.append(
                f"the original refused {len(refused)} probe(s) ({refused[0]}); those were "
                f"{'skipped' if item.adapter.kind == 'attention' else what}"
            )
        kept.append(item)
    return kept


def _verify_item(item: _Item) -> str:
    """Runs the converted module on its probes; raises _VerifyError on a mismatch."""
    worst = 0.0
    compared = 0
    with _EvalNoGrad(item.converted):
        for pr, ref in zip(item.probes, item.references, strict=False):
            if ref is _NO_REFERENCE and item.adapter.kind == "attention":
                continue
            got = item.converted(*pr.args, **pr.kwargs)
            if ref is _NO_REFERENCE:
                _check_finite(got, pr.description)
                continue
            err, why = _compare(got, ref, where=pr.compare_where)
            if why:
                raise _VerifyError(f"verification failed on probe '{pr.description}': {why}")
            worst = max(worst, err)
            compared += 1
    text = (
        f"verified on {compared} probe(s), max abs err {worst:.2e}"
        if item.probes
        else "no probes (not verified)"
    )
    if item.notes:
        text += "; " + "; ".join(item.notes)
    return text


def _report_skipped(skipped: list, strict: bool) -> None:
    unconvertible = [(p, m, w) for p, m, w in skipped if w != "excluded by include/exclude"]
    if not unconvertible:
        return
    lines = "; ".join(f"{p or '<model>'} ({type(m).__name__}): {w}" for p, m, w in unconvertible)
    if strict:
        path, _, why = unconvertible[0]
        raise ConversionError(path, f"can't be converted: {why} (all: {lines})")
    warnings.warn(f"memattn.optimize left these modules as they are: {lines}", stacklevel=3)


class _VerifyError(Exception):
    pass


_NO_REFERENCE = object()


def _call(model: nn.Module, probe: Any) -> Any:
    if isinstance(probe, Tensor):
        return model(probe)
    if isinstance(probe, dict):
        return model(**probe)
    if isinstance(probe, (tuple, list)):
        return model(*probe)
    raise TypeError(
        f"probe: expected a Tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, got {type(probe).__name__}"
    )


def _check_finite(out: Any, description: str) -> None:
    for n, t in enumerate(_tensors(out)):
        if (
            t is not None
            and t.is_floating_point()
            and not t.is_nested
            and not torch.isfinite(t).all()
        ):
            raise _VerifyError(f"output {n} on probe '{description}' is not finite")


def restore(model: nn.Module) -> nn.Module:
    """Undoes ``optimize``: every converted module gets its original class back (and, where
    the converter had replaced it, the original object, holding the current parameters).
    Returns ``model`` (or, when ``model`` itself was a replaced module, the original)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    holder = _Holder(model)
    parents = _parents(holder)
    converted = [(path, m) for path, m in holder.named_modules() if origin_of(m) is not None]
    hf_previous = model.__dict__.pop("_memattn_hf_previous", None)
    model.__dict__.pop("_memattn_hf_note", None)
    if hf_previous is not None:
        from memattn.integrations import hf

        hf.disable(model, hf_previous)

    # Containers first (they are outside their attention), deepest paths first.
    def order(entry):
        path, m = entry
        kind = _adapter_named(origin_of(m).adapter).kind
        return (0 if kind == "container" else 1, -path.count("."))

    for _, module in sorted(converted, key=order):
        origin = origin_of(module)
        original = _adapter_named(origin.adapter).restore(module, origin)
        _set_origin(module, None)
        _set_origin(original, None)
        _swap(parents, module, original)
    return holder.model


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


def is_attention_like(module: nn.Module) -> bool:
    """Does the module look like attention: nn.MultiheadAttention (or memattn's), a module an
    attention adapter recognises, or a class whose name says attention ("Attention",
    "Attn")?"""
    return (
        isinstance(module, nn.MultiheadAttention)
        or _adapter_for(module, "attention") is not None
        or bool(_ATTENTION_NAME.search(type(module).__name__))
    )


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) or (
        origin_of(module) is not None
        and _adapter_named(origin_of(module).adapter).kind == "container"
    )


def _under(path: str, by_prefix: dict[str, str]) -> str:
    """The value of the longest prefix (a module path) that contains ``path``, or ""."""
    best, found = -1, ""
    for prefix, value in by_prefix.items():
        if (prefix == "" or path == prefix or path.startswith(prefix + ".")) and len(prefix) > best:
            best, found = len(prefix), value
    return found


def _runs_memattn(module: nn.Module, hf_paths: dict[str, str], path: str) -> str:
    """How the module runs memattn ("" if it does not)."""
    if isinstance(module, mnn.MultiheadAttention):
        return "memattn.nn.MultiheadAttention"
    return _under(path, hf_paths)


@dataclass
class StatusRow:
    kind: str  # "attention" or "container"
    type: str
    count: int = 0
    memattn: int = 0
    converted_from: dict[str, int] = field(default_factory=dict)
    how: set[str] = field(default_factory=set)
    reasons: dict[str, int] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "type": self.type,
            "count": self.count,
            "memattn": self.memattn,
            "converted_from": dict(self.converted_from),
            "via": sorted(self.how),
            "not_converted_reasons": dict(self.reasons),
            "paths": list(self.paths),
        }


@dataclass
class Status:
    """What ``status(model)`` found: one row per module type (attention-like modules, and the
    containers whose fast paths matter). ``str()`` is a table; ``to_dict()`` is JSON-ready."""

    model: str
    rows: list[StatusRow]
    notes: list[str] = field(default_factory=list)

    @property
    def attention_total(self) -> int:
        return sum(r.count for r in self.rows if r.kind == "attention")

    @property
    def attention_memattn(self) -> int:
        return sum(r.memattn for r in self.rows if r.kind == "attention")

    def count(self, type_name_: str) -> int:
        """How many modules of the type whose name (qualified or bare) is given."""
        return sum(
            r.count
            for r in self.rows
            if r.type == type_name_ or r.type.rsplit(".", 1)[-1] == type_name_
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "attention_modules": self.attention_total,
            "attention_memattn": self.attention_memattn,
            "attention_other": self.attention_total - self.attention_memattn,
            "types": [r.to_dict() for r in self.rows],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        total, on = self.attention_total, self.attention_memattn
        lines = [
            f"memattn status of {self.model}: {total} attention module(s), {on} run memattn, "
            f"{total - on} do not"
        ]
        header = ("kind", "type", "count", "memattn", "converted from / note")
        table = []
        for r in self.rows:
            if r.converted_from:
                src = ", ".join(f"{k} x{v}" for k, v in r.converted_from.items())
            elif r.reasons:
                src = "; ".join(r.reasons)
            elif r.how and r.memattn:
                src = ", ".join(sorted(r.how))
            else:
                src = "-"
            on_text = (
                "yes" if r.memattn == r.count else ("no" if r.memattn == 0 else f"{r.memattn}")
            )
            table.append((r.kind, r.type, str(r.count), on_text, src))
        widths = [max(len(row[i]) for row in [header, *table]) for i in range(4)]
        fmt = "  ".join(f"{{:<{w}}}" if i != 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines.append(fmt.format(*header[:4]) + "  " + header[4])
        lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[4]))
        for row in table:
            lines.append(fmt.format(*row[:4]) + "  " + row[4])
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def status(model: nn.Module) -> Status:
    """Counts the attention-like modules of ``model`` per type, which run memattn, what each
    converted module was converted from, and why the others were not converted; plus the
    Transformer containers (whose torch fast path would bypass memattn unless converted)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    hf_mod = _hf()
    hf_paths: dict[str, str] = {}
    hf_reasons: dict[str, str] = {}
    notes: list[str] = []
    if hf_mod is not None:
        for path, module in model.named_modules():
            how = hf_mod.memattn_via(module)
            if how:
                hf_paths[path] = how
            elif hf_mod.is_hf_model(module):
                impl = getattr(module.config, "_attn_implementation", None)
                hf_reasons[path] = hf_mod.check(module) or (
                    f"transformers attn_implementation={impl!r}; memattn.optimize(model) "
                    "switches it to 'memattn'"
                )
        note = model.__dict__.get("_memattn_hf_note")
        if note:
            notes.append(note)
    rows: dict[tuple[str, str], StatusRow] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if _is_container(module):
            kind = "container"
        elif is_attention_like(module):
            kind = "attention"
        else:
            continue
        name = type_name(type(module))
        if origin_of(module) is not None and type(module) not in (
            mnn.MultiheadAttention,
            mnn.TransformerEncoderLayer,
            mnn.TransformerEncoder,
        ):
            name = type_name(type(module).__mro__[1]) + " (memattn subclass)"
        row = rows.setdefault((kind, name), StatusRow(kind, name))
        row.count += 1
        row.paths.append(path)
        origin = origin_of(module)
        if kind == "container":
            on = isinstance(module, (mnn.TransformerEncoderLayer, mnn.TransformerEncoder))
            how = "memattn forward (no fused fast path)" if on else ""
        else:
            how = _runs_memattn(module, hf_paths, path)
            on = bool(how)
        if on:
            row.memattn += 1
            row.how.add(how)
        if origin is not None:
            src = type_name(origin.cls)
            row.converted_from[src] = row.converted_from.get(src, 0) + 1
        elif not on:
            reason = _why_not(module, kind)
            hf_reason = _under(path, hf_reasons)
            if hf_reason and reason == "no adapter recognises it":
                reason = hf_reason
            row.reasons[reason] = row.reasons.get(reason, 0) + 1
    order = {"attention": 0, "container": 1}
    return Status(
        type(model).__name__,
        sorted(rows.values(), key=lambda r: (order[r.kind], -r.memattn, r.type)),
        notes,
    )


def _why_not(module: nn.Module, kind: str) -> str:
    adapter = _adapter_for(module, kind)
    if adapter is None:
        return "no adapter recognises it"
    if kind == "container":
        convertible = {
            id(m)
            for m in module.modules()
            if (a := _adapter_for(m, "attention")) is not None and a.check(m) is None
        }
        why = _container_check(module, adapter, convertible)
        return why or (
            "not converted yet: call memattn.optimize(model) (in eval, torch's fused fast "
            "path would bypass self_attn)"
        )
    why = adapter.check(module)
    return f"not convertible: {why}" if why else "not converted yet: call memattn.optimize(model)"
