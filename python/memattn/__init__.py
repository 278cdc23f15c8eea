"""memattn: memory-efficient attention with complete semantics.

``memattn.attention(q, k, v, ...)`` is scaled dot-product attention with PyTorch's SDPA
conventions (bool mask True = attend, float mask added, ``top_left`` / ``bottom_right``
causal, GQA/MQA, key padding, dropout, ``return_lse``) that never materialises the
``Lq x Lk`` scores, runs a C++ core (tiled online softmax, threads + SIMD on CPU), and works
with autograd and torch.compile. Fully masked rows give 0, not NaN.

- ``attention``: the function (see its docstring for shapes and conventions).
- ``explain(q, k, v, **kwargs)``: which backend and kernel a call would use, and why every
  other backend was not taken.
- ``build_info()``: how this copy was built (CPU instruction sets, CUDA).

The reference implementation used by the tests lives in ``memattn.reference``.
"""

from memattn import _memattn
from memattn.functional import attention, explain

__all__ = ["__version__", "attention", "build_info", "explain"]

__version__: str = _memattn.build_info()["version"]


def build_info() -> dict:
    """Build facts: ``version``, ``cpu_isas_built``, ``cpu_isas_usable`` (built and supported
    by this CPU), ``cpu_isa_selected`` and ``cpu_isa_reason`` (honours ``MEMATTN_CPU_ISA``),
    ``cuda_built``, ``cuda_reason`` (why not built) and ``cuda_summary`` (what the CUDA kernels
    were built for: architectures and CUDA runtime; empty without CUDA)."""
    return dict(_memattn.build_info())


# --- memattn.nn, converter and inspect (issue 4) -------------------------------------------
# Imported last: they build on `attention` above. `inspect` the function shadows the
# submodule name `memattn.inspect` as an attribute (the submodule stays importable).
from memattn import nn  # noqa: E402
from memattn.convert import optimize, restore, status  # noqa: E402
from memattn.inspect import inspect  # noqa: E402

__all__ += ["inspect", "nn", "optimize", "restore", "status"]
# --- end of issue 4 exports ------------------------------------------------------------------
