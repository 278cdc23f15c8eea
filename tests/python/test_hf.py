"""Hugging Face transformers with attn_implementation="memattn", against "eager".

Tiny models built from configs (no downloads), in float64 so that the comparison is tight:
forward outputs and the gradients of every parameter must match eager attention.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import memattn  # noqa: E402
from memattn.integrations import hf  # noqa: E402

TOL = 1e-9


def _tiny_bert_config(num_hidden_layers: int):
    """A BERT small enough for float64 tests against eager (vocabulary 60, 4 heads of 8)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=64,
    )


def _pair(model_cls, config, reference="eager"):
    """(reference model, memattn model) with the same weights, float64, eval mode (no
    dropout)."""
    eager = model_cls._from_config(copy.deepcopy(config), attn_implementation=reference)
    ours = model_cls._from_config(copy.deepcopy(config), attn_implementation="memattn")
    ours.load_state_dict(eager.state_dict())
    return eager.double().eval(), ours.double().eval()


def _output(model, inputs):
    out = model(**inputs)
    return out.last_hidden_state


def _compare_forward_backward(eager, ours, inputs, valid=None, tol=TOL):
    """Forward outputs (at ``valid`` positions) and all parameter gradients match."""
    outs = []
    for model in (eager, ours):
        model.zero_grad()
        out = _output(model, inputs)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        if valid is not None:
            weight = weight * valid.unsqueeze(-1)
        (out * weight).sum().backward()
        outs.append(out.detach())
    a, b = outs
    if valid is not None:
        a, b = a[valid], b[valid]
    err = (a - b).abs().max().item()
    assert err < tol, f"forward differs from the reference by {err:.3e}"
    grads_e = dict(eager.named_parameters())
    for name, p in ours.named_parameters():
        ge, gm = grads_e[name].grad, p.grad
        if ge is None and gm is None:
            continue
        assert ge is not None and gm is not None, f"{name}: gradient only on one side"
        err = (ge - gm).abs().max().item()
        assert err < tol * max(1.0, ge.abs().max().item()), f"{name}: grad differs by {err:.3e}"


def _calls(model, **inputs):
    with torch.no_grad():
        return memattn.inspect(model, **inputs).calls


def test_registered_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "memattn" in AttentionInterface._global_mapping
    assert "memattn" in AttentionMaskInterface._global_mapping
    hf.register()  # idempotent


def test_bert_encoder_with_padding():
    from transformers import BertModel

    config = _tiny_bert_config(num_hidden_layers=2)
    eager, ours = _pair(BertModel, config)
    ids = torch.randint(0, 60, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    _compare_forward_backward(eager, ours, inputs, valid=mask.bool())
    calls = _calls(ours, **inputs)
    assert len(calls) == 2
    for call in calls:
        assert call.backend.startswith("memattn/")
        # The padding mask reaches memattn as a key_padding_mask, not a [B, 1, Lq, Lk] mask.
        assert "key_padding_mask bool [3, 11]" in call.masks and "attn_mask" not in call.masks


def test_bart_encoder_decoder_cross_attention():
    from transformers import BartConfig, BartModel

    config = BartConfig(
        vocab_size=60,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=40,
        decoder_ffn_dim=40,
        max_position_embeddings=64,
    )
    eager, ours = _pair(BartModel, config)
    ids = torch.randint(3, 60, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    dec = torch.randint(3, 60, (2, 5))
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    _compare_forward_backward(eager, ours, inputs)
    calls = _calls(ours, **inputs)
    kinds = sorted((c.path.split(".")[0], c.attention, c.causal) for c in calls)
    assert kinds == [
        ("decoder", "cross", "no"),
        ("decoder", "self", "top_left"),
        ("encoder", "self", "no"),
    ], kinds
    cross = next(c for c in calls if c.attention == "cross")
    assert cross.q_shape[2] == 5 and cross.k_shape[2] == 9


def test_t5_relative_position_bias_gets_gradient():
    from transformers import T5Config, T5Model

    config = T5Config(
        vocab_size=60,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
    )
    eager, ours = _pair(T5Model, config)
    ids = torch.randint(0, 60, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 7:] = 0
    dec = torch.randint(0, 60, (2, 6))
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    _compare_forward_backward(eager, ours, inputs)
    bias = dict(ours.named_parameters())[
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    ]
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    calls = _calls(ours, **inputs)
    enc = next(c for c in calls if c.path.startswith("encoder"))
    # Learned bias as a float mask (with grad during training), padding as key_padding_mask.
    assert "attn_mask float64" in enc.masks and "key_padding_mask" in enc.masks
    dec_self = next(c for c in calls if c.path.startswith("decoder") and c.attention == "self")
    assert dec_self.causal == "top_left" and "attn_mask float64" in dec_self.masks


def test_vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
    )
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    # ViT's eager attention takes its softmax in float32 even for float64 models: compare
    # with eager at float32 precision and with sdpa (float64 throughout) tightly.
    eager, ours = _pair(ViTModel, config)
    _compare_forward_backward(eager, ours, {"pixel_values": pixels}, tol=1e-6)
    sdpa, ours = _pair(ViTModel, config, reference="sdpa")
    _compare_forward_backward(sdpa, ours, {"pixel_values": pixels})
    calls = _calls(ours, pixel_values=pixels)
    assert len(calls) == 2 and all(c.q_shape[2] == 17 for c in calls)


def test_output_attentions_returns_weights():
    from transformers import BertModel

    config = _tiny_bert_config(num_hidden_layers=1)
    eager, ours = _pair(BertModel, config)
    ids = torch.randint(0, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
        b = ours(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    assert b is not None and b.shape == a.shape == (2, 4, 7, 7)
    assert (a - b).abs().max().item() < TOL


def test_optimize_switches_a_built_model_and_restore_switches_back():
    from transformers import BertModel

    config = _tiny_bert_config(num_hidden_layers=1)
    model = BertModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ids = torch.randint(0, 60, (2, 7))
    before = memattn.status(model)
    assert before.attention_memattn == 0
    memattn.optimize(model, probe={"input_ids": ids})
    assert model.config._attn_implementation == "memattn"
    st = memattn.status(model)
    assert st.attention_memattn == st.attention_total > 0
    assert all(c.backend.startswith("memattn/") for c in _calls(model, input_ids=ids))
    memattn.restore(model)
    assert model.config._attn_implementation == "eager"


def test_model_without_attention_interface_is_a_documented_limitation():
    """DeBERTa-v2 computes attention in its own code: transformers accepts
    attn_implementation="memattn" for it but never calls the function. memattn says so
    instead of pretending."""
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=64,
    )
    model = DebertaV2Model._from_config(copy.deepcopy(config), attn_implementation="memattn")
    ids = torch.randint(0, 60, (2, 7))
    calls = _calls(model, input_ids=ids)
    assert calls and not any(c.backend.startswith("memattn") for c in calls)
    plain = DebertaV2Model._from_config(copy.deepcopy(config)).eval()
    assert "AttentionInterface" in hf.check(plain)
    with pytest.warns(UserWarning, match="AttentionInterface"):
        memattn.optimize(plain)
    assert plain.config._attn_implementation != "memattn"
    st = memattn.status(plain)
    assert st.attention_memattn == 0
    assert any("AttentionInterface" in reason for row in st.rows for reason in row.reasons)
    with pytest.raises(memattn.convert.ConversionError, match="AttentionInterface"):
        memattn.optimize(plain, strict=True)
