"""memattn.nn.MultiheadAttention against torch.nn.MultiheadAttention, and the Transformer layers.

Parity is checked in float64 (tight) and float32, over every constructor option, every mask
kind nn.MHA takes (with its conventions: bool True = masked out), need_weights and
average_attn_weights, unbatched and batch_first input; gradients of inputs, parameters and a
float mask; the same errors for bad input; and the layers in train and eval, where torch's
encoder fast path would otherwise bypass self_attn.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import memattn
from memattn import nn as mnn

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

E, H = 16, 4
B, LQ, LK = 2, 5, 7
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}

OPTIONS = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 5, "vdim": 11},
    "batch_first": {"batch_first": True},
    "batch_first_kdim_bias_kv": {"batch_first": True, "kdim": 3, "vdim": 6, "add_bias_kv": True},
}


def _pair(dtype=torch.float64, **options):
    """(torch's module, memattn's module) with the same random weights, biases included."""
    ref = torch.nn.MultiheadAttention(E, H, dtype=dtype, **options)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = mnn.MultiheadAttention(E, H, dtype=dtype, **options)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(options, dtype, batched=True, self_attention=False):
    kdim, vdim = options.get("kdim", E), options.get("vdim", E)
    bf = options.get("batch_first", False)

    def x(L, d):
        if not batched:
            return torch.randn(L, d, dtype=dtype)
        return torch.randn((B, L, d) if bf else (L, B, d), dtype=dtype)

    if self_attention:
        s = x(LQ, E)
        return s, s, s
    return x(LQ, E), x(LK, kdim), x(LK, vdim)


def _masks(dtype, lq=LQ, lk=LK, batched=True):
    """nn.MHA-convention masks, none of which masks a whole row."""
    i = torch.arange(lq).unsqueeze(1)
    j = torch.arange(lk).unsqueeze(0)
    bool2d = j > i + 1  # True = masked out
    kpm = torch.zeros(B, lk, dtype=torch.bool)
    kpm[1, lk - 2 :] = True
    if not batched:
        kpm = kpm[1]
    bool3d = torch.rand(B * H, lq, lk) < 0.3
    bool3d[..., 0] = False
    n3 = B * H if batched else H
    return {
        "none": {},
        "bool2d": {"attn_mask": bool2d},
        "float2d": {"attn_mask": torch.randn(lq, lk, dtype=dtype)},
        "bool3d": {"attn_mask": bool3d[:n3]},
        "float3d": {"attn_mask": torch.randn(n3, lq, lk, dtype=dtype)},
        "bool_kpm": {"key_padding_mask": kpm},
        "float_kpm": {"key_padding_mask": kpm.to(dtype) * -1e4},
        "bool2d_bool_kpm": {"attn_mask": bool2d, "key_padding_mask": kpm},
        "float2d_bool_kpm": {
            "attn_mask": torch.randn(lq, lk, dtype=dtype),
            "key_padding_mask": kpm,
        },
        "bool2d_float_kpm": {"attn_mask": bool2d, "key_padding_mask": kpm.to(dtype) * -1e4},
    }


def _close(name, got, want, dtype):
    assert got.shape == want.shape, f"{name}: shape {list(got.shape)} != {list(want.shape)}"
    tol = TOL[dtype] * max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol, f"{name}: max abs err {err:.3e} > {tol:.3e}"


def _run_both(ref, ours, args, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixed mask types warn (in both)
        return ref(*args, **kwargs), ours(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_parity_all_masks(option, dtype):
    options = OPTIONS[option]
    ref, ours = _pair(dtype, **options)
    args = _inputs(options, dtype)
    for mask_name, masks in _masks(dtype).items():
        for need_weights, average in ((False, True), (True, True), (True, False)):
            kwargs = dict(masks, need_weights=need_weights, average_attn_weights=average)
            (o1, w1), (o2, w2) = _run_both(ref, ours, args, kwargs)
            name = f"{option}/{mask_name}/need_weights={need_weights}/average={average}"
            _close(f"{name}: output", o2, o1, dtype)
            assert (w1 is None) == (w2 is None), name
            if w1 is not None:
                _close(f"{name}: weights", w2, w1, dtype)


@pytest.mark.parametrize("option", ["default", "bias_kv_zero_attn", "kdim_vdim"])
def test_unbatched_input(option):
    options = OPTIONS[option]
    ref, ours = _pair(torch.float64, **options)
    args = _inputs(options, torch.float64, batched=False)
    for mask_name, masks in _masks(torch.float64, batched=False).items():
        for need_weights in (False, True):
            kwargs = dict(masks, need_weights=need_weights, average_attn_weights=False)
            (o1, w1), (o2, w2) = _run_both(ref, ours, args, kwargs)
            _close(f"{mask_name}: output", o2, o1, torch.float64)
            if need_weights:
                _close(f"{mask_name}: weights", w2, w1, torch.float64)


@pytest.mark.parametrize("option", ["default", "batch_first", "bias_kv_zero_attn"])
def test_is_causal_hint_follows_torch(option):
    """The hint drops the mask only without key_padding_mask and need_weights=False; the
    result equals the explicit mask's either way (when the hint is right)."""
    options = OPTIONS[option]
    ref, ours = _pair(torch.float64, **options)
    args = _inputs(options, torch.float64, self_attention=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(LQ, dtype=torch.float64)
    causal_bool = torch.ones(LQ, LQ, dtype=torch.bool).triu(1)
    kpm = torch.zeros(B, LQ, dtype=torch.bool)
    kpm[1, -1] = True
    for mask in (causal, causal_bool):
        for kw in ({}, {"key_padding_mask": kpm}):
            for need_weights in (False, True):
                kwargs = dict(kw, attn_mask=mask, is_causal=True, need_weights=need_weights)
                (o1, _), (o2, _) = _run_both(ref, ours, args, kwargs)
                _close(f"{kw.keys()}/{need_weights}", o2, o1, torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        ours(*args, is_causal=True)


def _grads(module, args, kwargs, float_mask=None):
    module.zero_grad()
    args = [a.detach().clone().requires_grad_() for a in args]
    if float_mask is not None:
        float_mask = float_mask.detach().clone().requires_grad_()
        kwargs = dict(kwargs, attn_mask=float_mask)
    out, weights = module(*args, **kwargs)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    if weights is not None:
        loss = (
            loss
            + (
                weights * torch.linspace(-1, 2, weights.numel()).to(out.dtype).view_as(weights)
            ).sum()
        )
    loss.backward()
    grads = {f"input{n}": a.grad for n, a in enumerate(args)}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    if float_mask is not None:
        grads["attn_mask"] = float_mask.grad
    return grads


@pytest.mark.parametrize("option", list(OPTIONS))
def test_gradients_match(option):
    options = OPTIONS[option]
    ref, ours = _pair(torch.float64, **options)
    args = _inputs(options, torch.float64)
    masks = _masks(torch.float64)
    for mask_name in ("none", "bool2d_bool_kpm", "float2d", "float3d"):
        for need_weights in (False, True):
            kw = dict(masks[mask_name], need_weights=need_weights)
            float_mask = kw.pop("attn_mask") if mask_name.startswith("float") else None
            g1 = _grads(ref, args, kw, float_mask)
            g2 = _grads(ours, args, kw, float_mask)
            for name in g1:
                if g1[name] is None:
                    assert g2[name] is None, name
                    continue
                _close(
                    f"{mask_name}/{need_weights}: grad {name}", g2[name], g1[name], torch.float64
                )


def test_fully_masked_rows_give_zero_not_nan():
    ref, ours = _pair(torch.float64)
    q, k, v = _inputs({}, torch.float64)
    mask = torch.zeros(LQ, LK, dtype=torch.bool)
    mask[2] = True  # query 2 sees no key
    o1, w1 = ref(q, k, v, attn_mask=mask)
    o2, w2 = ours(q, k, v, attn_mask=mask)
    assert torch.isnan(o1[2]).all() and torch.isnan(w1[:, 2]).all()  # torch's NaN
    assert not torch.isnan(o2).any() and not torch.isnan(w2).any()
    assert (w2[:, 2] == 0).all()
    # Attention part is 0: the output row is the output projection's bias.
    expected = ours.out_proj.bias.expand(B, E)
    _close("fully masked row", o2[2], expected, torch.float64)
    rows = [i for i in range(LQ) if i != 2]
    _close("other rows", o2[rows], o1[rows], torch.float64)


def _bad_calls():
    x = torch.randn(LQ, B, E)
    y = torch.randn(LK, B, E)
    return {
        "query 4-D": ((torch.randn(1, LQ, B, E),) * 3, {}),
        "key 2-D with batched query": ((x, y[:, 0], y[:, 0]), {}),
        "embed dim": ((torch.randn(LQ, B, E + 1),) * 3, {}),
        "key/value shapes": ((x, y, torch.randn(LK - 1, B, E)), {}),
        "2-D mask shape": ((x, y, y), {"attn_mask": torch.zeros(LQ, LK - 1, dtype=torch.bool)}),
        "3-D mask shape": ((x, y, y), {"attn_mask": torch.zeros(3, LQ, LK, dtype=torch.bool)}),
        "4-D mask": ((x, y, y), {"attn_mask": torch.zeros(1, 1, LQ, LK, dtype=torch.bool)}),
        "int mask": ((x, y, y), {"attn_mask": torch.zeros(LQ, LK, dtype=torch.int64)}),
        "int key_padding_mask": ((x, y, y), {"key_padding_mask": torch.zeros(B, LK, dtype=torch.int32)}),
        "key_padding_mask batch": ((x, y, y), {"key_padding_mask": torch.zeros(B + 1, LK, dtype=torch.bool)}),
        "key_padding_mask length": ((x, y, y), {"key_padding_mask": torch.zeros(B, LK + 1, dtype=torch.bool)}),
        "key_padding_mask 3-D": ((x, y, y), {"key_padding_mask": torch.zeros(B, LK, 1, dtype=torch.bool)}),
        "is_causal without mask": ((x, y, y), {"is_causal": True}),
        "unbatched 3-D mask shape": ((x[:, 0], y[:, 0], y[:, 0]), {"attn_mask": torch.zeros(3, LQ, LK, dtype=torch.bool)}),
        "dtype": ((x.double(), y.double(), y.double()), {}),
        "key features": ((x, torch.randn(LK, B, E + 2), torch.randn(LK, B, E + 2)), {}),
    }  # fmt: skip


@pytest.mark.parametrize("option", ["default", "kdim_vdim", "bias_kv_zero_attn"])
def test_same_errors_as_torch(option):
    ref, ours = _pair(torch.float32, **OPTIONS[option])
    ref.train()  # torch's training path (its eval fast path skips some checks)
    ours.train()
    for name, (args, kwargs) in _bad_calls().items():
        outcomes = []
        for module in (ref, ours):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module(*args, **kwargs)
                outcomes.append("ok")
            except Exception as e:  # noqa: BLE001 - comparing whatever torch raises
                outcomes.append(f"{type(e).__name__}: {e}")
        assert outcomes[1] == outcomes[0], (
            f"{name}:\n torch:   {outcomes[0]}\n memattn: {outcomes[1]}"
        )


def test_mixed_mask_types_warn_like_torch():
    _, ours = _pair(torch.float32)
    q, k, v = _inputs({}, torch.float32)
    kpm = torch.zeros(B, LK)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        ours(q, k, v, key_padding_mask=kpm, attn_mask=torch.zeros(LQ, LK, dtype=torch.bool))


def test_state_dict_keys_and_loading_both_ways():
    for options in OPTIONS.values():
        ref, ours = _pair(torch.float32, **options)
        assert list(ref.state_dict()) == list(ours.state_dict())
        fresh_torch = torch.nn.MultiheadAttention(E, H, **options)
        fresh_torch.load_state_dict(ours.state_dict(), strict=True)
        fresh_ours = mnn.MultiheadAttention(E, H, **options)
        fresh_ours.load_state_dict(ref.state_dict(), strict=True)
        for (n1, t1), (n2, t2) in zip(
            ref.state_dict().items(), fresh_ours.state_dict().items(), strict=True
        ):
            assert n1 == n2 and torch.equal(t1, t2)
    assert isinstance(ours, torch.nn.MultiheadAttention)


def test_dropout_in_training_statistics_and_reproducibility():
    _, ours = _pair(torch.float64, dropout=0.5, add_bias_kv=True, add_zero_attn=True)
    q, k, v = _inputs({}, torch.float64)
    ours.eval()
    expected, _ = ours(q, k, v, need_weights=False)
    ours.train()
    torch.manual_seed(11)
    a, _ = ours(q, k, v, need_weights=False)
    torch.manual_seed(11)
    b, weights = ours(q, k, v, need_weights=True)
    assert a.shape == expected.shape and torch.equal(a, b), "same seed, same dropout mask"
    assert not torch.allclose(a, expected)
    # Weights are the probabilities before dropout: rows sum to 1 (2 virtual columns too).
    assert weights.shape == (B, LQ, LK + 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, LQ, dtype=torch.float64))
    # Dropout is unbiased: the mean over many draws approaches the eval output (the output
    # projection is linear). Tolerance: a few standard errors.
    runs = torch.stack([ours(q, k, v, need_weights=False)[0] for _ in range(300)])
    err = (runs.mean(0) - expected).abs()
    stderr = runs.std(0) / math.sqrt(runs.shape[0])
    assert (err <= 5 * stderr + 1e-9).float().mean() > 0.99


def test_need_weights_block_wise_matches_full(monkeypatch):
    """Weights computed a few query rows at a time equal the one-block result."""
    ref, ours = _pair(torch.float64, add_bias_kv=True)
    q, k, v = _inputs({}, torch.float64)
    mask = _masks(torch.float64)["float3d"]["attn_mask"]
    _, full = ours(q, k, v, attn_mask=mask, average_attn_weights=False)
    monkeypatch.setattr(mnn, "_WEIGHTS_BLOCK_ELEMENTS", 1)  # one query row per block
    _, blocks = ours(q, k, v, attn_mask=mask, average_attn_weights=False)
    _, torch_w = ref(q, k, v, attn_mask=mask, average_attn_weights=False)
    _close("block-wise", blocks, full, torch.float64)
    _close("vs torch", blocks, torch_w, torch.float64)


def test_nested_tensor_self_attention():
    ref, ours = _pair(torch.float32, batch_first=True)
    ref.eval()
    ours.eval()
    parts = [torch.randn(4, E), torch.randn(6, E)]
    nt = torch.nested.nested_tensor(parts)
    with torch.no_grad():
        out, weights = ours(nt, nt, nt, need_weights=False)
        want, _ = ref(nt, nt, nt, need_weights=False)
    assert out.is_nested and weights is None
    for got, exp in zip(out.unbind(), want.unbind(), strict=True):
        _close("nested", got, exp, torch.float32)


# --------------------------------------------------------------------------------------------
# Inside Transformer layers
# --------------------------------------------------------------------------------------------


def _copy_into(dst, src):
    dst.load_state_dict(src.state_dict(), strict=True)
    return dst


def _layer_inputs(batch_first, dtype=torch.float32, L=6):
    src = torch.randn((B, L, E) if batch_first else (L, B, E), dtype=dtype)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, L - 2 :] = True
    return src, kpm


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_train_and_eval(batch_first, norm_first, monkeypatch):
    ref = torch.nn.TransformerEncoderLayer(
        E, H, dim_feedforward=24, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    )
    ours = _copy_into(
        mnn.TransformerEncoderLayer(
            E, H, dim_feedforward=24, dropout=0.0, batch_first=batch_first, norm_first=norm_first
        ),
        ref,
    )
    assert type(ours.self_attn) is mnn.MultiheadAttention
    src, kpm = _layer_inputs(batch_first)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(
        src.shape[1 if batch_first else 0]
    )
    cases = [{}, {"src_key_padding_mask": kpm}, {"src_mask": causal, "is_causal": True}]
    for kwargs in cases:
        ref.train()
        ours.train()
        _close(f"train {list(kwargs)}", ours(src, **kwargs), ref(src, **kwargs), torch.float32)
    # Eval without autograd: torch may take its fused fast path; memattn's layer never does.
    ref.eval()
    ours.eval()
    with torch.no_grad():
        wants = [ref(src, **kwargs) for kwargs in cases]

    def refuse(*args, **kwargs):
        raise AssertionError("torch._transformer_encoder_layer_fwd was called")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", refuse)
    with torch.no_grad():
        for kwargs, want in zip(cases, wants, strict=True):
            _close(f"eval {list(kwargs)}", ours(src, **kwargs), want, torch.float32)
    assert torch.backends.mha.get_fastpath_enabled(), "the process-wide switch is untouched"


def test_encoder_eval_runs_memattn_with_padding_and_no_nested_tensors(monkeypatch):
    ref_layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True)
    ref = torch.nn.TransformerEncoder(ref_layer, num_layers=2, enable_nested_tensor=True).eval()
    ours = mnn.TransformerEncoder(
        mnn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True), num_layers=2
    ).eval()
    _copy_into(ours, ref)
    src, kpm = _layer_inputs(True)
    with torch.no_grad():
        want = ref(src, src_key_padding_mask=kpm)  # nested tensors and the fused kernel
    calls = []
    real = memattn.nn.attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("key_padding_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mnn, "attention", counting)
    monkeypatch.setattr(torch, "_nested_tensor_from_mask", None)
    with torch.no_grad():
        got = ours(src, src_key_padding_mask=kpm)
    assert len(calls) == 2 and all(c is not None and c.dtype == torch.bool for c in calls)
    valid = ~kpm  # torch's nested path leaves padded positions at 0
    _close("encoder eval", got[valid], want[valid], torch.float32)


def test_plain_torch_encoder_with_memattn_layers_handles_nested_input():
    """A torch TransformerEncoder packs padded batches into nested tensors in eval; memattn's
    layer runs them padded."""
    layer = mnn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = torch.nn.TransformerEncoder(layer, num_layers=1).eval()
    ref = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True), 1
    ).eval()
    _copy_into(ref, enc)
    src, kpm = _layer_inputs(True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = enc(src, src_key_padding_mask=kpm)
        want = ref(src, src_key_padding_mask=kpm)
    valid = ~kpm
    _close("nested", got[valid], want[valid], torch.float32)


@pytest.mark.parametrize("batch_first", [True, False])
def test_decoder_layer_train_and_eval_with_gradients(batch_first):
    ref = torch.nn.TransformerDecoderLayer(
        E, H, dim_feedforward=24, dropout=0.0, batch_first=batch_first, dtype=torch.float64
    )
    ours = _copy_into(
        mnn.TransformerDecoderLayer(
            E, H, dim_feedforward=24, dropout=0.0, batch_first=batch_first, dtype=torch.float64
        ),
        ref,
    )
    assert type(ours.multihead_attn) is mnn.MultiheadAttention
    tgt, _ = _layer_inputs(batch_first, torch.float64, L=5)
    memory, mkpm = _layer_inputs(batch_first, torch.float64, L=8)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    kwargs = {"tgt_mask": tgt_mask, "tgt_is_causal": True, "memory_key_padding_mask": mkpm}
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        ours.train(mode == "train")
        grads = []
        outs = []
        for module in (ref, ours):
            module.zero_grad()
            out = module(tgt, memory, **kwargs)
            out.pow(2).sum().backward()
            outs.append(out)
            grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
        _close(f"{mode} output", outs[1], outs[0], torch.float64)
        for name in grads[0]:
            _close(f"{mode} grad {name}", grads[1][name], grads[0][name], torch.float64)


def test_bfloat16_error_within_twice_torchs():
    """DESIGN §4: in bf16, our error vs the float64 result is at most 2x torch's own bf16
    error plus a small floor."""
    ref64, _ = _pair(torch.float64, add_bias_kv=True)
    ref16 = torch.nn.MultiheadAttention(E, H, add_bias_kv=True, dtype=torch.bfloat16)
    ours16 = mnn.MultiheadAttention(E, H, add_bias_kv=True, dtype=torch.bfloat16)
    ref16.load_state_dict(ref64.state_dict())
    ours16.load_state_dict(ref64.state_dict())
    q, k, v = _inputs({}, torch.float64)
    masks = _masks(torch.float64)["bool2d_bool_kpm"]
    want, _ = ref64(q, k, v, need_weights=False, **masks)
    low = [t.bfloat16() for t in (q, k, v)]
    torch_err = (ref16(*low, need_weights=False, **masks)[0].double() - want).abs().max().item()
    ours_err = (ours16(*low, need_weights=False, **masks)[0].double() - want).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-3 * max(1.0, want.abs().max().item()), (
        ours_err,
        torch_err,
    )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    _, ours = _pair(torch.float32, batch_first=True)
    x = torch.randn(B, LQ, E, requires_grad=True)
    kpm = torch.zeros(B, LQ, dtype=torch.bool)
    kpm[1, 3:] = True
    compiled = torch.compile(ours, fullgraph=True)
    out = compiled(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    (grad,) = torch.autograd.grad(out.sum(), x)
    want = ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    _close("compiled output", out, want, torch.float32)
    _close("compiled grad", grad, want_grad, torch.float32)
    torch._dynamo.reset()
