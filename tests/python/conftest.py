"""Shared fixtures for memattn's Python tests.

- Every test starts from a seed derived from its own id: inputs are fresh random numbers, yet a
  failure reproduces when the test is run alone.
- ``cpu_isa`` runs a test once per CPU kernel variant usable on this machine (``MEMATTN_CPU_ISA``),
  so the base, AVX2 and AVX-512 builds of the kernels are all exercised.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import memattn


def usable_cpu_isas() -> list[str]:
    info = memattn.build_info()
    return list(info.get("cpu_isas_usable", info["cpu_isas_built"]))


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=usable_cpu_isas())
def cpu_isa(request, monkeypatch):
    """Forces one CPU kernel variant for the test and checks the core really selected it."""
    monkeypatch.setenv("MEMATTN_CPU_ISA", request.param)
    selected = memattn.build_info()["cpu_isa_selected"]
    assert selected == request.param, (
        f"MEMATTN_CPU_ISA={request.param} but build_info() says {selected!r} is selected"
    )
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
