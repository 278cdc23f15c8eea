"""The converter: optimize / restore / status / inspect (DESIGN.md §3), and the model demo."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memattn
from memattn import convert
from memattn import nn as mnn

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

E, H = 16, 4


def _transformer(**kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor notes
        return nn.Transformer(
            d_model=E,
            nhead=H,
            num_encoder_layers=2,
            num_decoder_layers=1,
            dim_feedforward=24,
            **{"batch_first": True, **kwargs},
        )


def _inputs(batch_first=True):
    torch.manual_seed(1)
    src = torch.randn(2, 7, E)
    tgt = torch.randn(2, 5, E)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    return {
        "src": src,
        "tgt": tgt,
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(5),
        "tgt_is_causal": True,
        "src_key_padding_mask": kpm,
        "memory_key_padding_mask": kpm,
    }


def _classes(model):
    return {path: type(m) for path, m in model.named_modules()}


def _params(model):
    return {name: (id(p), p.detach().clone()) for name, p in model.named_parameters()}


def _assert_untouched(model, classes, params):
    assert _classes(model) == classes
    for name, p in model.named_parameters():
        assert id(p) == params[name][0] and torch.equal(p, params[name][1]), name
    assert all(convert.origin_of(m) is None for m in model.modules())


@pytest.mark.parametrize("batch_first", [True, False])
def test_optimize_transformer_converts_verifies_and_restores(batch_first):
    model = _transformer(batch_first=batch_first).eval()
    inputs = _inputs(batch_first)
    classes, params = _classes(model), _params(model)
    with torch.no_grad():
        before = model(**inputs)
    assert memattn.optimize(model, probe=inputs) is model
    st = memattn.status(model)
    assert st.attention_total == st.attention_memattn == 4
    assert st.count("memattn.nn.MultiheadAttention") == 4
    assert st.count("torch.nn.MultiheadAttention") == 0
    # The parameters are the very same objects (nothing copied).
    for name, p in model.named_parameters():
        assert id(p) == params[name][0], name
    for path, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            assert type(m) is mnn.MultiheadAttention, path
            assert convert.origin_of(m).verification.startswith("verified on 4 probe(s)")
    with torch.no_grad():
        after = model(**inputs)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)
    # Training mode too (dropout off for the comparison).
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.train()
    out = model(**inputs)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    memattn.restore(model)
    _assert_untouched_classes = _classes(model)
    assert _assert_untouched_classes == classes
    assert memattn.status(model).attention_memattn == 0


def test_optimize_is_idempotent():
    model = _transformer()
    memattn.optimize(model)
    classes = _classes(model)
    ids = {path: id(m) for path, m in model.named_modules()}
    origins = {path: convert.origin_of(m) for path, m in model.named_modules()}
    memattn.optimize(model)
    assert _classes(model) == classes
    assert {path: id(m) for path, m in model.named_modules()} == ids
    assert {path: convert.origin_of(m) for path, m in model.named_modules()} == origins
    memattn.restore(model)
    memattn.restore(model)  # restoring an unconverted model is a no-op
    assert memattn.status(model).attention_memattn == 0


def test_state_dict_round_trip_both_ways():
    model = _transformer()
    plain_sd = copy.deepcopy(model.state_dict())
    memattn.optimize(model)
    assert list(model.state_dict()) == list(plain_sd)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _transformer()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(torch.load(buf), strict=True)  # converted -> plain
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, plain_sd[k]), k
    converted = memattn.optimize(_transformer())
    converted.load_state_dict(fresh.state_dict(), strict=True)  # plain -> converted
    for k, v in converted.state_dict().items():
        assert torch.equal(v, plain_sd[k]), k


def test_restore_keeps_trained_weights_and_optimizer_keeps_working():
    model = _transformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    memattn.optimize(model)
    inputs = _inputs()
    model.train()
    model(**inputs).pow(2).mean().backward()
    opt.step()  # the optimizer holds the same parameters the converted model uses
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    memattn.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k


class _Scaled(nn.MultiheadAttention):
    """A subclass whose forward differs from nn.MHA's: conversion must not be proven."""

    def forward(self, *args, **kwargs):
        out, w = super().forward(*args, **kwargs)
        return 2 * out, w


class _Net(nn.Module):
    def __init__(self, second):
        super().__init__()
        self.first = nn.MultiheadAttention(E, H)
        self.block = nn.Sequential(nn.Linear(E, E))
        self.second = second

    def forward(self, x):
        x = self.first(x, x, x, need_weights=False)[0]
        return self.second(x, x, x, need_weights=False)[0]


def test_atomic_failure_leaves_the_model_unchanged():
    model = _Net(_Scaled(E, H))
    classes, params = _classes(model), _params(model)
    with pytest.raises(convert.ConversionError) as info:
        memattn.optimize(model)
    assert info.value.path == "second"
    assert "verification failed" in str(info.value) and "'second'" in str(info.value)
    _assert_untouched(model, classes, params)
    # Without it, the rest converts.
    memattn.optimize(model, exclude=["second"])
    assert type(model.first) is mnn.MultiheadAttention and type(model.second) is _Scaled


class _Boom(convert.Adapter):
    name = "boom"

    def matches(self, module):
        return isinstance(module, nn.Linear) and not hasattr(module, "in_proj_weight")

    def convert(self, module):
        raise RuntimeError("this adapter always fails")


def test_failure_after_earlier_conversions_rolls_them_back():
    model = _Net(nn.MultiheadAttention(E, H))
    classes, params = _classes(model), _params(model)
    boom = convert.register_adapter(_Boom())
    try:
        with pytest.raises(convert.ConversionError, match="always fails") as info:
            memattn.optimize(model, verify=False)
    finally:
        convert._ADAPTERS.remove(boom)
    assert info.value.path in {"block.0", "first.out_proj", "second.out_proj"}
    _assert_untouched(model, classes, params)


class _WithTemperature(nn.MultiheadAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = nn.Parameter(torch.ones(()))


def test_subclass_with_extra_parameters_is_left_alone_with_the_reason():
    model = _Net(_WithTemperature(E, H))
    with pytest.warns(UserWarning, match="temperature"):
        memattn.optimize(model)
    assert type(model.first) is mnn.MultiheadAttention
    assert type(model.second) is _WithTemperature
    st = memattn.status(model)
    row = next(r for r in st.rows if r.type.endswith("_WithTemperature"))
    assert row.memattn == 0 and any("temperature" in reason for reason in row.reasons)
    assert "temperature" in str(st)
    with pytest.raises(convert.ConversionError, match="temperature"):
        memattn.optimize(_Net(_WithTemperature(E, H)), strict=True)


class VendoredMHA(nn.Module):
    """A copy of nn.MultiheadAttention's layout and forward that is not a subclass of it."""

    def __init__(self, embed_dim, num_heads, kdim=None):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = kdim or embed_dim
        self.vdim = embed_dim
        if kdim is None:
            self.in_proj_weight = nn.Parameter(torch.randn(3 * embed_dim, embed_dim) * 0.3)
        else:
            self.q_proj_weight = nn.Parameter(torch.randn(embed_dim, embed_dim) * 0.3)
            self.k_proj_weight = nn.Parameter(torch.randn(embed_dim, kdim) * 0.3)
            self.v_proj_weight = nn.Parameter(torch.randn(embed_dim, embed_dim) * 0.3)
        self.in_proj_bias = nn.Parameter(torch.randn(3 * embed_dim) * 0.1)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
        average_attn_weights=True, is_causal=False,
    ):  # fmt: skip
        separate = hasattr(self, "q_proj_weight")
        return F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            None if separate else self.in_proj_weight, self.in_proj_bias, None, None, False, 0.0,
            self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=getattr(self, "q_proj_weight", None),
            k_proj_weight=getattr(self, "k_proj_weight", None),
            v_proj_weight=getattr(self, "v_proj_weight", None),
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )  # fmt: skip


class _Holder(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v=None):
        return self.attn(q, k, k if v is None else v, need_weights=False)[0]


@pytest.mark.parametrize("kdim", [None, 5])
def test_mha_layout_adapter_replaces_and_restores_the_original_object(kdim):
    model = _Holder(VendoredMHA(E, H, kdim=kdim))
    original = model.attn
    keys = list(model.state_dict())
    q, k, v = torch.randn(6, 2, E), torch.randn(4, 2, kdim or E), torch.randn(4, 2, E)
    with torch.no_grad():
        want = model(q, k, v)
    memattn.optimize(model, probe=(q, k, v))
    assert type(model.attn) is mnn.MultiheadAttention
    assert model.attn.in_proj_bias is original.in_proj_bias  # shared, not copied
    assert list(model.state_dict()) == keys
    origin = convert.origin_of(model.attn)
    assert origin.cls is VendoredMHA and origin.adapter == "nn.MultiheadAttention layout"
    with torch.no_grad():
        torch.testing.assert_close(model(q, k, v), want, atol=1e-5, rtol=1e-4)
    st = memattn.status(model)
    assert st.rows[0].converted_from == {f"{__name__}.VendoredMHA": 1}
    memattn.restore(model)
    assert model.attn is original


class _LooksLikeMHA(nn.Module):
    """nn.MHA's parameter layout, but a different forward: can't be proven, left alone."""

    def __init__(self):
        super().__init__()
        self.embed_dim, self.num_heads = E, H
        self.in_proj_weight = nn.Parameter(torch.randn(3 * E, E))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * E))
        self.out_proj = nn.Linear(E, E)

    def forward(self, x):
        return self.out_proj(x)


def test_mha_layout_with_another_forward_is_not_converted():
    model = _Holder(nn.MultiheadAttention(E, H))
    model.other = _LooksLikeMHA()
    with pytest.warns(UserWarning, match="refused every verification probe"):
        memattn.optimize(model)
    assert type(model.attn) is mnn.MultiheadAttention
    assert type(model.other) is _LooksLikeMHA


def test_bare_multihead_attention_and_include_exclude():
    mha = nn.MultiheadAttention(E, H)
    out = memattn.optimize(mha)
    assert out is mha and type(mha) is mnn.MultiheadAttention
    assert type(memattn.restore(mha)) is nn.MultiheadAttention
    model = _transformer()
    memattn.optimize(model, include=["decoder"])
    types = _classes(model)
    assert types["decoder.layers.0.self_attn"] is mnn.MultiheadAttention
    assert types["encoder.layers.0.self_attn"] is nn.MultiheadAttention
    assert types["encoder.layers.0"] is nn.TransformerEncoderLayer


def test_shared_module_is_converted_once_at_every_path():
    shared = nn.MultiheadAttention(E, H)
    model = _Net(shared)
    model.first = shared
    memattn.optimize(model)
    assert model.first is model.second and type(shared) is mnn.MultiheadAttention
    assert memattn.status(model).attention_total == 1


def test_user_subclass_of_encoder_layer_keeps_its_methods():
    class MyLayer(nn.TransformerEncoderLayer):
        def forward(self, src, *args, **kwargs):
            return super().forward(src, *args, **kwargs) + 1.0

    layer = MyLayer(E, H, dim_feedforward=24, batch_first=True).eval()
    model = nn.Sequential(layer)
    src = torch.randn(2, 6, E)
    with torch.no_grad():
        want = model(src)
    memattn.optimize(model)
    assert isinstance(layer, MyLayer) and isinstance(layer, mnn.TransformerEncoderLayer)
    with torch.no_grad():
        torch.testing.assert_close(model(src), want, atol=1e-5, rtol=1e-4)
    memattn.restore(model)
    assert type(layer) is MyLayer


def test_status_content():
    model = _transformer()
    st = memattn.status(model)
    d = st.to_dict()
    assert d["attention_modules"] == 4 and d["attention_memattn"] == 0
    rows = {r["type"]: r for r in d["types"]}
    assert rows["torch.nn.MultiheadAttention"]["count"] == 4
    assert rows["torch.nn.TransformerEncoderLayer"]["kind"] == "container"
    memattn.optimize(model)
    st = memattn.status(model)
    text = str(st)
    assert "memattn.nn.MultiheadAttention" in text and "torch.nn.MultiheadAttention x4" in text
    assert text.splitlines()[0].startswith("memattn status of Transformer: 4 attention module(s)")
    rows = {r["type"]: r for r in st.to_dict()["types"]}
    assert rows["memattn.nn.MultiheadAttention"]["converted_from"] == {
        "torch.nn.MultiheadAttention": 4
    }
    assert rows["memattn.nn.TransformerEncoderLayer"]["memattn"] == 2


def test_inspect_records_every_attention_call():
    model = _transformer().eval()
    inputs = _inputs()
    with torch.no_grad():
        before = memattn.inspect(model, **inputs)
    assert len(before) == 4 and not any(c.backend.startswith("memattn") for c in before)
    fast = [c for c in before if c.backend == "torch fused encoder-layer fast path"]
    assert [c.path for c in fast] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    memattn.optimize(model)
    with torch.no_grad():
        report = memattn.inspect(model, **inputs)
    calls = {c.path: c for c in report}
    assert list(calls) == [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
        "decoder.layers.0.self_attn",
        "decoder.layers.0.multihead_attn",
    ]
    enc = calls["encoder.layers.0.self_attn"]
    assert enc.attention == "self" and enc.q_shape == [2, H, 7, E // H]
    assert "key_padding_mask bool [2, 7]" in enc.masks and enc.causal == "no"
    assert enc.backend == "memattn/cpu" and enc.kernel.startswith("cpu/") and enc.reason
    dec = calls["decoder.layers.0.self_attn"]
    assert dec.causal == "top_left" and dec.masks == ""  # the is_causal hint replaced the mask
    cross = calls["decoder.layers.0.multihead_attn"]
    assert cross.attention == "cross" and cross.k_shape[2] == 7 and cross.q_shape[2] == 5
    assert cross.dtype == "float32"
    torch.testing.assert_close(report.output, before.output, atol=2e-5, rtol=1e-4)
    text = str(report)
    assert "decoder.layers.0.multihead_attn" in text and "why:" in text
    assert report.to_dict()["calls"][0]["path"] == "encoder.layers.0.self_attn"


def test_model_demo_small():
    from memattn.demo_model import format_report, run_model_demo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_model_demo("cpu", small=True, reps=1, measure_memory=False)
    assert result["verify"]["ok"]
    assert (
        result["status_after"]["attention_memattn"] == result["status_after"]["attention_modules"]
    )
    assert result["restore"] == {"memattn_modules_left": 0, "output_bit_identical": True}
    assert {(r["mode"], r["impl"]) for r in result["rows"]} == {
        ("eval", "torch"),
        ("train", "torch"),
        ("eval", "memattn"),
        ("train", "memattn"),
    }
    text = format_report(result)
    for part in (
        "1. inspect",
        "2. status",
        "3. optimize",
        "4. verify",
        "6. before / after",
        "7. restore",
    ):
        assert part in text


def test_dtype_without_a_memattn_backend_is_left_alone():
    """float16 has no CPU kernel: the modules are not converted (nothing breaks later)."""
    model = _transformer().half()
    with pytest.warns(UserWarning, match="no backend for torch.float16"):
        memattn.optimize(model)
    assert memattn.status(model).attention_memattn == 0
    with pytest.raises(convert.ConversionError, match="float16 is not supported on CPU"):
        memattn.optimize(model, strict=True)
