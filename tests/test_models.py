"""Model definitions: the paper's variants to the unit, and the options users need."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repvgg
from repvgg import ModelConfigError, RepVGG, RepVGGBlock
from repvgg.runtime.measure import count_macs, count_parameters
from tests.helpers import relative_error, trained_looking

# Counted on the authors' repvgg.py (their RepVGG constructor): train params, deploy params, GMACs at 224.
SPEC_COUNTS = {
    "repvgg_a0": (9_108_968, 8_309_384, 1.361),
    "repvgg_a1": (14_092_264, 12_789_864, 2.364),
    "repvgg_a2": (28_210_600, 25_499_944, 5.117),
    "repvgg_b0": (15_817_960, 14_339_048, 3.058),
    "repvgg_b1": (57_415_016, 51_829_480, 11.815),
    "repvgg_b1g2": (45_782_376, 41_360_104, 8.810),
    "repvgg_b1g4": (39_966_056, 36_125_416, 7.307),
    "repvgg_b2": (89_022_376, 80_315_112, 18.377),
    "repvgg_b2g2": (70_846_376, 63_956_712, 13.680),
    "repvgg_b2g4": (61_758_376, 55_777_512, 11.332),
    "repvgg_b3": (123_085_288, 110_960_872, 26.209),
    "repvgg_b3g2": (96_911_848, 87_404_776, 19.446),
    "repvgg_b3g4": (83_825_128, 75_626_728, 16.064),
    "repvgg_d2se": (133_334_836, 120_387_572, 32.830),
}


def test_list_models_is_the_paper_and_d2se() -> None:
    assert repvgg.list_models() == list(SPEC_COUNTS)


@pytest.mark.parametrize("name", list(SPEC_COUNTS))
def test_parameter_counts_and_macs_match_the_authors_code(name: str) -> None:
    train_params, deploy_params, gmacs = SPEC_COUNTS[name]
    with torch.device("meta"):
        train = repvgg.create_model(name)
        deploy = repvgg.create_model(name, deploy=True)
        converted = repvgg.reparameterize(train.eval())
    assert count_parameters(train) == train_params
    assert count_parameters(deploy) == deploy_params
    assert count_parameters(converted) == deploy_params
    assert count_macs(deploy) / 1e9 == pytest.approx(gmacs, rel=0.005)


def test_names_are_forgiving_and_unknown_names_suggest() -> None:
    assert repvgg.create_model("RepVGG-B1g2", deploy=True).model_name == "repvgg_b1g2"
    assert repvgg.create_model("a0", deploy=True).model_name == "repvgg_a0"
    with pytest.raises(ModelConfigError, match="did you mean repvgg_b1g4"):
        repvgg.create_model("repvgg_b1g5")


def test_authors_constructor_arguments_build_the_same_model() -> None:
    # As the authors' create_RepVGG_B1g2 calls their class.
    groups = {layer: 2 for layer in range(2, 27, 2)}
    with torch.device("meta"):
        ours = RepVGG(
            num_blocks=[4, 6, 16, 1],
            num_classes=1000,
            width_multiplier=[2, 2, 2, 4],
            override_groups_map=groups,
            deploy=False,
            use_checkpoint=False,
        )
        named = repvgg.create_model("repvgg_b1g2")
    assert ours.config == named.config
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in named.state_dict().items()
    }
    positional = RepVGG([2, 4, 14, 1], 10, [0.75, 0.75, 0.75, 2.5], None, True)
    assert positional.deploy and positional.num_classes == 10


def test_grouped_layers_are_the_even_layers() -> None:
    with torch.device("meta"):
        model = repvgg.create_model("repvgg_b1g4")
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    assert len(blocks) == 28
    assert [i for i, b in enumerate(blocks) if b.groups == 4] == list(range(2, 27, 2))
    assert all(b.rbr_1x1.conv.groups == b.groups for b in blocks)


def test_d2se_has_se_in_every_block_and_runs_on_non_square_input() -> None:
    model = repvgg.create_model("repvgg_d2se", num_classes=7).eval()
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    assert all(isinstance(b.se, repvgg.SEBlock) for b in blocks)
    assert blocks[0].se.down.out_channels == 64 // 16
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 40))
    assert out.shape == (1, 7)


def test_in_chans_and_small_image_strides() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=1, strides=(1, 1, 2, 2, 2))
    x = torch.randn(2, 1, 28, 28)
    assert model.forward_features(x).shape == (2, 1280, 4, 4)
    assert model(x).shape == (2, 10)
    paper = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=1)
    assert paper.forward_features(x).shape == (2, 1280, 1, 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strides": (2, 2, 2, 2)}, "five stages"),
        ({"strides": (3, 2, 2, 2, 2)}, "five stages"),
    ],
)
def test_bad_options_are_explained(options: dict[str, object], message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        repvgg.create_model("repvgg_a0", **options)


def test_num_classes_zero_returns_pooled_features_and_reset_classifier() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=0).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1280)
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert model.config["num_classes"] == 5


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = repvgg.create_model("repvgg_a0", num_classes=4).double().train()
    checkpointed = repvgg.create_model("repvgg_a0", num_classes=4, use_checkpoint=True).double().train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    for model in (plain, checkpointed):
        model(x).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    checkpointed.set_grad_checkpointing(False)
    assert not checkpointed.use_checkpoint


@pytest.mark.parametrize("deploy", [False, True])
def test_channels_last_gives_the_same_outputs(deploy: bool) -> None:
    model = trained_looking("repvgg_a0", num_classes=10)
    if deploy:
        model = repvgg.reparameterize(model)
    x = torch.randn(2, 3, 64, 56)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    assert relative_error(actual, expected) < 1e-5


def test_deploy_model_body_is_only_conv_and_relu() -> None:
    model = repvgg.create_model("repvgg_a0", deploy=True)
    kinds = {type(m) for m in model.modules()}
    assert kinds == {
        RepVGG,
        RepVGGBlock,
        nn.Sequential,
        nn.Conv2d,
        nn.ReLU,
        nn.Identity,
        nn.AdaptiveAvgPool2d,
        nn.Linear,
    }
