"""timm as a peer: its RepVGG weights, in training and re-parameterized form, load into ours exactly."""

from __future__ import annotations

import os

import pytest
import torch

import repvgg

os.environ["HF_HUB_OFFLINE"] = "1"
timm = pytest.importorskip("timm", reason="timm is a test dependency: install the dev extra")


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b1g4"])
@pytest.mark.parametrize("reparameterized", [False, True], ids=["train-form", "reparam-form"])
def test_timm_weights_give_timm_logits(name: str, reparameterized: bool) -> None:
    peer = timm.create_model(name, pretrained=False, num_classes=1000)
    repvgg.randomize_batchnorm_(peer, seed=7)
    peer.eval()
    if reparameterized:
        from timm.utils.model import reparameterize_model

        peer = reparameterize_model(peer)
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        expected = peer(x)
        ours = repvgg.load_checkpoint(peer.state_dict()).eval()
        actual = ours(x)
    assert ours.model_name == name and ours.deploy == reparameterized
    assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_our_weights_load_into_timm() -> None:
    ours = repvgg.randomize_batchnorm_(repvgg.create_model("repvgg_a0"), seed=8).eval()
    peer = timm.create_model("repvgg_a0", pretrained=False).eval()
    peer.load_state_dict(repvgg.convert_state_dict(ours.state_dict(), to="timm"), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ours(x)
        assert float((peer(x) - expected).abs().max() / expected.abs().max()) <= 1e-5
