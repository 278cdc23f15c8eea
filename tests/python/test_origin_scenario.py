"""The failure memattn exists to end (issue 4, item 4).

A hand-written "memory-efficient" wrapper subclassed nn.MultiheadAttention and supported only
self-attention without masks. ``nn.TransformerEncoderLayer`` calls
``self_attn(x, x, x, attn_mask=..., key_padding_mask=..., need_weights=False, is_causal=...)``,
so the model crashed with NotImplementedError; a later fix put other optimizations on top
without removing the wrapper, and the crash stayed until someone counted module types by hand.

Here: the wrapper sits in a TransformerEncoder; ``status`` counts it; ``optimize`` replaces it;
the encoder runs with masks in training and inference and matches the float64 reference;
``status`` shows none of the wrappers left; ``restore`` brings them back (and the crash).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memattn

pytestmark = [
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
    # A bool key_padding_mask with a float causal mask: legal, deprecated, warned by both.
    pytest.mark.filterwarnings("ignore:Support for mismatched"),
]

E, H, LAYERS = 32, 4, 3
B, L = 3, 10


class SelfOnlyEfficientMHA(nn.MultiheadAttention):
    """The user's wrapper: SDPA for plain self-attention, nothing else."""

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if not (query is key and key is value):
            raise NotImplementedError("SelfOnlyEfficientMHA supports self-attention only")
        if key_padding_mask is not None or attn_mask is not None:
            raise NotImplementedError("SelfOnlyEfficientMHA does not support masks")
        x = query.transpose(0, 1) if self.batch_first else query  # [L, B, E]
        Lx, Bx, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (
            t.reshape(Lx, Bx * self.num_heads, self.head_dim).transpose(0, 1)
            for t in qkv.chunk(3, dim=-1)
        )
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = out.transpose(0, 1).reshape(Lx, Bx, self.embed_dim)
        out = self.out_proj(out)
        return (out.transpose(0, 1) if self.batch_first else out), None


def _user_model(batch_first: bool) -> nn.TransformerEncoder:
    """How the user built it: a torch encoder whose layers' self_attn became the wrapper."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        E, H, dim_feedforward=64, dropout=0.0, batch_first=batch_first
    )
    encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
    for i, layer in enumerate(encoder.layers):
        wrapper = SelfOnlyEfficientMHA(E, H, batch_first=batch_first)
        wrapper.load_state_dict(layer.self_attn.state_dict())
        with torch.no_grad():  # distinct, non-trivial weights per layer
            wrapper.in_proj_bias.normal_(0, 0.1 * (i + 1))
        layer.self_attn = wrapper
    return encoder


def _reference(model: nn.TransformerEncoder) -> nn.TransformerEncoder:
    """The same weights in plain torch modules, in float64: the ground truth."""
    ref = copy.deepcopy(model)
    for layer in ref.layers:
        plain = nn.MultiheadAttention(E, H, batch_first=layer.self_attn.batch_first)
        plain.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = plain
    return ref.double()


def _inputs(batch_first: bool, dtype=torch.float32):
    torch.manual_seed(1)
    src = torch.randn(B, L, E, dtype=dtype)
    if not batch_first:
        src = src.transpose(0, 1).contiguous()
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 7:] = True
    kpm[2, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
    return src, kpm, causal


def _count(model, cls_name):
    return memattn.status(model).count(cls_name)


def _valid(out, kpm, batch_first):
    """Output rows of real (non-padded) tokens."""
    return out[~kpm] if batch_first else out.transpose(0, 1)[~kpm]


@pytest.mark.parametrize("batch_first", [False, True])
def test_origin_scenario(batch_first):
    model = _user_model(batch_first)
    src, kpm, causal = _inputs(batch_first)
    wrapper_type = f"{__name__}.SelfOnlyEfficientMHA"

    # The crash, as it happened: the encoder passes masks to self_attn.
    model.train()
    with pytest.raises(NotImplementedError, match="does not support masks"):
        model(src, src_key_padding_mask=kpm)
    # status counts the wrappers, no hand counting.
    before = memattn.status(model)
    assert before.count(wrapper_type) == LAYERS
    assert before.attention_memattn == 0

    memattn.optimize(model, probe=(src,))
    after = memattn.status(model)
    assert after.count(wrapper_type) == 0, str(after)
    assert after.count("memattn.nn.MultiheadAttention") == LAYERS
    row = next(r for r in after.rows if r.type == "memattn.nn.MultiheadAttention")
    assert row.converted_from == {wrapper_type: LAYERS}
    for layer in model.layers:
        note = memattn.convert.origin_of(layer.self_attn).verification
        assert "refused" in note and "compared with torch.nn.MultiheadAttention.forward" in note

    reference = _reference(model)
    src64 = src.double()
    cases = {
        "key_padding_mask": {"src_key_padding_mask": kpm},
        "causal mask": {"mask": causal, "is_causal": True},
        "causal mask + key_padding_mask": {"mask": causal, "src_key_padding_mask": kpm},
        "float key_padding_mask": {"src_key_padding_mask": kpm.float() * -1e4},
    }
    for mode in ("train", "eval"):
        model.train(mode == "train")
        reference.train(mode == "train")
        for name, kwargs in cases.items():
            kw64 = {
                k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in kwargs.items()
            }
            with torch.set_grad_enabled(mode == "train"):
                got = model(src, **kwargs)
            with torch.no_grad():
                reference.train()  # torch's plain math path in float64 (dropout is 0)
                want = reference(src64, **kw64)
            valid = ~kpm if "key_padding_mask" in name else torch.ones_like(kpm)
            err = _valid(got, ~valid, batch_first).double() - _valid(want, ~valid, batch_first)
            err = err.abs().max().item()
            assert err < 2e-5, f"{mode}, {name}: max abs err vs float64 reference {err:.2e}"

    # Training works end to end with masks: gradients reach every parameter.
    model.train()
    model.zero_grad()
    model(src, mask=causal, src_key_padding_mask=kpm).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    # restore brings the wrappers back, with their weights, and so the crash.
    memattn.restore(model)
    assert _count(model, wrapper_type) == LAYERS
    assert all(type(layer.self_attn) is SelfOnlyEfficientMHA for layer in model.layers)
    model.train()
    with pytest.raises(NotImplementedError):
        model(src, src_key_padding_mask=kpm)


def test_origin_scenario_in_float64_matches_torch_tightly():
    model = _user_model(batch_first=True).double()
    src, kpm, causal = _inputs(True, torch.float64)
    memattn.optimize(model)
    reference = _reference(model)
    model.train()
    reference.train()
    got = model(src, mask=causal, src_key_padding_mask=kpm)
    want = reference(src, mask=causal, src_key_padding_mask=kpm)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grads = torch.autograd.grad(got.pow(2).sum(), list(model.parameters()))
    grads_ref = torch.autograd.grad(want.pow(2).sum(), list(reference.parameters()))
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9)
