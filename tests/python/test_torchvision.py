"""torchvision models convert and match (issue 4: torchvision's ViT uses nn.MultiheadAttention).

torchvision does not import beside the CPU torch wheel of the CI machine, so these tests skip
there and run on the GPU machine (scripts/gpu_check.sh), on the CPU backend until the CUDA
backend exists.
"""

from __future__ import annotations

import pytest
import torch

import memattn

try:  # torchvision raises RuntimeError (not ImportError) beside a mismatched torch
    import torchvision
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"torchvision unavailable: {exc}", allow_module_level=True)


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=96,
        num_classes=10,
    ).double()


def test_vit_converts_and_matches_in_eval_and_train():
    model = _tiny_vit()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        expected_eval = model(images)
    model.train()
    expected_train = model(images)
    expected_train.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    memattn.optimize(model)
    counts = memattn.status(model).to_dict()
    assert counts["attention_memattn"] == 2 and counts["attention_other"] == 0, counts
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected_eval, rtol=1e-10, atol=1e-10)
    model.train()
    model(images).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-9, atol=1e-10, msg=name)

    memattn.restore(model)
    assert isinstance(model.encoder.layers[0].self_attention, torch.nn.MultiheadAttention)
    assert type(model.encoder.layers[0].self_attention) is torch.nn.MultiheadAttention
