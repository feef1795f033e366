"""The training-time block designs: the paper's block, its Table 6 and 7 ablations, and QARepVGG.

Plain data without torch, so that the command line can offer the designs without importing it.
"""

from dataclasses import dataclass
from typing import Literal

from repvgg.exceptions import ModelConfigError


@dataclass(frozen=True)
class BlockDesign:
    """Which branches a block trains with and where its BatchNorms sit.

    ``dense``, the 3x3 branch: ``"bn"`` (conv + BN), ``"plain"`` (a bare conv), ``"trivial"`` (kernel
    ``I + W``) or ``"dirac"`` (DiracNet's ``diag(a) I + diag(b) W / ||W||``), see
    :class:`~repvgg.core.fusion.IdentityPlusConv`, or ``"online"`` (the 3x3, 1x1 and identity branches with
    learned scales merged into one kernel every step, :class:`~repvgg.core.fusion.OnlineConv`).
    ``one_by_one`` and ``identity``: ``None`` (no such branch),
    ``"bn"`` (the branch ends in BatchNorm) or ``"plain"`` (a bare 1x1 convolution / the input itself).
    ``asymmetric`` adds ACNet's 3x1 + BN and 1x3 + BN branches; ``post_bn`` puts one BatchNorm after the sum;
    ``relu_in_branches`` applies a ReLU to each branch before the sum, which makes the block impossible
    to convert (the paper's reference point). Every other design converts to one 3x3 convolution through
    the one fusion function.
    """

    dense: Literal["bn", "plain", "trivial", "dirac", "online"] = "bn"
    one_by_one: Literal["bn", "plain"] | None = "bn"
    identity: Literal["bn", "plain"] | None = "bn"
    asymmetric: bool = False
    post_bn: bool = False
    relu_in_branches: bool = False
    #: RepOpt-VGG: the plain conv + BN trains with gradient multipliers equal to a multi-branch block's
    #: (``repvgg.core.repopt``); the training loop applies them.
    gradient_multipliers: bool = False
    description: str = ""

    @property
    def convertible(self) -> bool:
        return not self.relu_in_branches


#: The block designs of the paper's Tables 6 and 7, and QARepVGG (Chu et al., 2022).
BLOCK_DESIGNS: dict[str, BlockDesign] = {
    "repvgg": BlockDesign(description="3x3+BN, 1x1+BN and BN identity branches (the paper's block)"),
    "no_identity": BlockDesign(identity=None, description="3x3+BN and 1x1+BN branches (Table 6)"),
    "no_1x1": BlockDesign(one_by_one=None, description="3x3+BN and BN identity branches (Table 6)"),
    "plain": BlockDesign(one_by_one=None, identity=None, description="3x3+BN alone (Table 6)"),
    "identity_no_bn": BlockDesign(identity="plain", description="identity branch without BN (Table 7)"),
    "post_add_bn": BlockDesign(
        dense="plain",
        one_by_one="plain",
        identity="plain",
        post_bn=True,
        description="no BN in the branches, one BN after the sum (Table 7)",
    ),
    "relu_in_branch": BlockDesign(
        relu_in_branches=True, description="a ReLU in every branch before the sum; not convertible (Table 7)"
    ),
    "diracnet": BlockDesign(
        dense="dirac",
        one_by_one=None,
        identity=None,
        post_bn=True,
        description="one conv with kernel diag(a)I + diag(b)W/||W||, then BN (DiracNet, Table 7)",
    ),
    "trivial": BlockDesign(
        dense="trivial",
        one_by_one=None,
        identity=None,
        post_bn=True,
        description="one conv with kernel I + W, then BN (trivial re-param, Table 7)",
    ),
    "acb": BlockDesign(
        one_by_one=None,
        identity=None,
        asymmetric=True,
        description="3x3+BN, 3x1+BN and 1x3+BN branches (ACNet's block, Table 7)",
    ),
    "qarepvgg": BlockDesign(
        one_by_one="plain",
        identity="plain",
        post_bn=True,
        description="3x3+BN, bare 1x1 and identity, one BN after the sum (QARepVGG)",
    ),
    "online": BlockDesign(
        dense="online",
        one_by_one=None,
        identity=None,
        post_bn=True,
        description="3x3, 1x1 and identity with learned scales merged into one kernel every step, one conv, "
        "then BN (OREPA's online re-parameterization)",
    ),
    "repopt": BlockDesign(
        one_by_one=None,
        identity=None,
        gradient_multipliers=True,
        description="one 3x3+BN trained with the gradient multipliers of 3x3, 1x1 and identity branches "
        "(RepOpt-VGG)",
    ),
}


def block_design(name: str) -> BlockDesign:
    """The registered design called ``name``; an unknown name gets one sentence listing the known ones."""
    if name not in BLOCK_DESIGNS:
        raise ModelConfigError(f"Unknown block {name!r}: choose one of {', '.join(BLOCK_DESIGNS)}.")
    return BLOCK_DESIGNS[name]
