"""BiSeNet v1 with a growable classifier for class-incremental segmentation.

Paper: `BiSeNet: Bilateral Segmentation Network for Real-time Semantic Segmentation`
(Yu, Wang, Peng, Gao, Yu, Sang; ECCV 2018) - https://arxiv.org/abs/1808.00897

Layout:
    spatial path   three conv-bn-relu blocks, stride 2 each            -> 1/8
    context path   torchvision ResNet: features at 1/16 and 1/32, global average context,
                   an Attention Refinement Module on each, upsampled and summed   -> 1/8
    fusion         Feature Fusion Module (concat, conv-bn-relu, channel attention)
    head           conv-bn-relu producing the embedding, then a 1x1 classifier
    aux heads      two on the context path (1/8 and 1/16), built only when ``aux=True``
                   (training); loss = main + 1.0 x each aux, as in the paper.

``forward_features`` returns the embedding the classifier sees (what SDR shapes and ALIFE
replays); ``add_classes`` grows every classifier with MiB's background-based initialisation.
Every resize targets an explicit size, so odd input sizes (e.g. 97x131) work and the ONNX
graph uses only standard ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, ResNet


def _resnet10() -> ResNet:
    """ResNet with one BasicBlock per stage: the tiny backbone used by tests and CPU benchmarks."""
    return ResNet(BasicBlock, [1, 1, 1, 1])


# name -> (constructor, channels at 1/16, channels at 1/32)
BACKBONES: dict[str, tuple[Callable[[], ResNet], int, int]] = {
    "resnet10": (_resnet10, 256, 512),
    "resnet18": (resnet.resnet18, 256, 512),
    "resnet50": (resnet.resnet50, 1024, 2048),
    "resnet101": (resnet.resnet101, 1024, 2048),
}


@dataclass(frozen=True)
class BiSeNetConfig:
    """Architecture of a BiSeNet; stored in every model directory.

    Attributes:
        num_classes: Output classes, background (index 0) included.
        backbone: Key of ``BACKBONES``.
        context_channels: Width of the context path (ARM outputs); 128 in the paper.
        embed_channels: Width of the fused features and of the embedding fed to the classifier.
        sigmoid_outputs: One sigmoid per class instead of a softmax with a background class (DKD,
            STAR): the classifier's row 0 is then an auxiliary classifier that no pixel is labelled
            with, and every output puts a constant 0 in channel 0. As sigmoid(z) > 0.5 iff z > 0,
            the argmax is background exactly where no class passes 0.5, else the class of the
            largest logit: the rule of the papers' evaluation, kept by every exported graph.
    """

    num_classes: int
    backbone: str = "resnet18"
    context_channels: int = 128
    embed_channels: int = 256
    sigmoid_outputs: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONES)}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.context_channels < 8 or self.embed_channels < 8:
            raise ValueError("context_channels and embed_channels must be >= 8")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SegmentationOutput:
    """Everything one training forward pass exposes to the incremental-learning losses.

    Attributes:
        logits: (B, C, H, W) at the input size.
        features: (B, D, H/8, W/8) embedding fed to the 1x1 classifier.
        stages: Backbone stage outputs (1/4, 1/8, 1/16, 1/32), for feature distillation.
        aux_logits: (B, C, H, W) per auxiliary head; empty when the model has none.
    """

    logits: Tensor
    features: Tensor
    stages: list[Tensor]
    aux_logits: list[Tensor] = field(default_factory=list)


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class SpatialPath(nn.Module):
    """Three stride-2 conv-bn-relu blocks keeping spatial detail at 1/8, then a 1x1 projection."""

    def __init__(self, out_ch: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            ConvBNReLU(3, 64, kernel=7, stride=2),
            ConvBNReLU(64, 64, stride=2),
            ConvBNReLU(64, 64, stride=2),
            ConvBNReLU(64, out_ch, kernel=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class AttentionRefinement(nn.Module):
    """ARM: conv-bn-relu, then channel attention from the global average (1x1 conv, BN, sigmoid)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch)
        self.attention = nn.Sequential(nn.Conv2d(out_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        weight = torch.sigmoid(self.attention(feat.mean(dim=(2, 3), keepdim=True)))  # (B, C, 1, 1)
        return feat * weight


class ContextPath(nn.Module):
    """ResNet backbone with ARMs on the 1/16 and 1/32 features and a global-average context."""

    def __init__(self, backbone: str, out_ch: int) -> None:
        super().__init__()
        build, ch16, ch32 = BACKBONES[backbone]
        net = build()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.arm16 = AttentionRefinement(ch16, out_ch)
        self.arm32 = AttentionRefinement(ch32, out_ch)
        self.global_context = ConvBNReLU(ch32, out_ch, kernel=1)
        self.refine32 = ConvBNReLU(out_ch, out_ch)
        self.refine16 = ConvBNReLU(out_ch, out_ch)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Returns the context at 1/8 and 1/16 (both ``out_ch`` wide) and the four stage outputs."""
        f4 = self.layer1(self.stem(x))
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        f32 = self.layer4(f16)
        context = self.global_context(f32.mean(dim=(2, 3), keepdim=True))  # (B, C, 1, 1)
        up32 = self.arm32(f32) + context
        up32 = self.refine32(F.interpolate(up32, size=f16.shape[2:], mode="nearest"))
        up16 = self.arm16(f16) + up32
        up16 = self.refine16(F.interpolate(up16, size=f8.shape[2:], mode="nearest"))
        return up16, up32, [f4, f8, f16, f32]


class FeatureFusion(nn.Module):
    """FFM: concatenation, conv-bn-relu, and a squeeze-excitation style reweighting (x + x * a)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch, kernel=1)
        self.attention = nn.Sequential(
            nn.Conv2d(out_ch, out_ch // 4, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch // 4, out_ch, 1),
            nn.Sigmoid(),
        )

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        feat = self.conv(torch.cat([spatial, context], dim=1))
        return feat + feat * self.attention(feat.mean(dim=(2, 3), keepdim=True))


class SegmentationHead(nn.Module):
    """Conv-bn-relu embedding followed by a growable 1x1 classifier."""

    def __init__(self, in_ch: int, mid_ch: int, num_classes: int) -> None:
        super().__init__()
        self.embed = ConvBNReLU(in_ch, mid_ch)
        self.classifier = nn.Conv2d(mid_ch, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))

    @torch.no_grad()
    def add_classes(self, n: int) -> None:
        """Appends ``n`` outputs initialised as in MiB (see ``mib_init_classifier``)."""
        self.classifier = mib_init_classifier(self.classifier, n)


def bias_of(conv: nn.Conv2d) -> Tensor:
    """The bias of a convolution built with one (every classifier here), for code that reads or edits it.

    Raises:
        ValueError: When ``conv`` was built with ``bias=False``.
    """
    if conv.bias is None:
        raise ValueError(f"{conv} has no bias")
    return conv.bias


@torch.no_grad()
def mib_init_classifier(classifier: nn.Conv2d, n_new: int) -> nn.Conv2d:
    """Returns a copy of ``classifier`` with ``n_new`` more outputs, initialised as in MiB.

    New weights copy the background weights; new biases and the background bias become
    ``b_bg - log(n_new + 1)``. The background + new logits are then equal and their summed
    probability equals the old background probability, while old-class probabilities are unchanged.
    """
    old_c = classifier.out_channels
    grown = nn.Conv2d(classifier.in_channels, old_c + n_new, 1).to(classifier.weight)
    bias, grown_bias = bias_of(classifier), bias_of(grown)
    grown.weight[:old_c] = classifier.weight
    grown_bias[:old_c] = bias
    bg_bias = bias[0] - math.log(n_new + 1)
    grown.weight[old_c:] = classifier.weight[0:1]
    grown_bias[old_c:] = bg_bias
    grown_bias[0] = bg_bias
    return grown


class BiSeNet(nn.Module):
    """BiSeNet v1 (ResNet context path) with a stable incremental interface.

    Args:
        config: Architecture (see ``BiSeNetConfig``).
        aux: Build the two auxiliary heads (training only; exported models have none).
    """

    def __init__(self, config: BiSeNetConfig, aux: bool = True) -> None:
        super().__init__()
        self.config = config
        ctx, emb = config.context_channels, config.embed_channels
        self.spatial_path = SpatialPath(ctx)
        self.context_path = ContextPath(config.backbone, ctx)
        self.fusion = FeatureFusion(2 * ctx, emb)
        self.head = SegmentationHead(emb, emb, config.num_classes)
        self.aux_heads = nn.ModuleList(
            [SegmentationHead(ctx, max(ctx // 2, 8), config.num_classes) for _ in range(2)] if aux else []
        )

    @property
    def num_classes(self) -> int:
        return self.head.classifier.out_channels

    @property
    def embed_dim(self) -> int:
        return self.head.classifier.in_channels

    @property
    def body_channels(self) -> int:
        """Channels of the backbone's output (``forward_train(x).stages[-1]``, SDR's ``features['body']``)."""
        return BACKBONES[self.config.backbone][2]

    def _fused(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        spatial = self.spatial_path(x)
        context8, context16, stages = self.context_path(x)
        if context8.shape[2:] != spatial.shape[2:]:  # odd sizes round differently on the two paths
            context8 = F.interpolate(context8, size=spatial.shape[2:], mode="bilinear", align_corners=False)
        return self.fusion(spatial, context8), context8, context16, stages

    def forward_features(self, x: Tensor) -> Tensor:
        """Embedding fed to the classifier: (B, 3, H, W) -> (B, D, ~H/8, ~W/8)."""
        return self.head.embed(self._fused(x)[0])

    def _outputs(self, logits: Tensor) -> Tensor:
        """With ``sigmoid_outputs``, channel 0 becomes the constant 0 threshold: (B, C, h, w) -> same."""
        if not self.config.sigmoid_outputs:
            return logits
        return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, 1:]], dim=1)

    def classify(self, features: Tensor) -> Tensor:
        """Logits at the embedding's resolution: (B, D, h, w) -> (B, C, h, w)."""
        return self._outputs(self.head.classifier(features))

    def forward_head(self, features: Tensor, size: tuple[int, ...]) -> Tensor:
        """Classifies an embedding and upsamples: (B, D, h, w) -> (B, C, *size)."""
        return F.interpolate(self.classify(features), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        """Logits at the input size: (B, 3, H, W) -> (B, C, H, W)."""
        return self.forward_head(self.forward_features(x), x.shape[2:])

    def forward_train(self, x: Tensor) -> SegmentationOutput:
        """One pass exposing logits, embedding, backbone stages and (if built) auxiliary logits."""
        size = x.shape[2:]
        fused, context8, context16, stages = self._fused(x)
        features = self.head.embed(fused)
        aux = [
            F.interpolate(self._outputs(head(feat)), size=size, mode="bilinear", align_corners=False)
            for head, feat in zip(self.aux_heads, (context8, context16), strict=False)
        ]
        return SegmentationOutput(self.forward_head(features, size), features, stages, aux)

    def add_classes(self, n: int) -> None:
        """Grows the main and auxiliary classifiers by ``n`` classes with MiB's initialisation."""
        if n < 1:
            raise ValueError(f"add_classes needs n >= 1, got {n}")
        for head in [self.head, *self.aux_heads]:
            head.add_classes(n)
        self.config = BiSeNetConfig(**{**self.config.to_dict(), "num_classes": self.num_classes})

    def load_backbone_weights(self, path: Path) -> None:
        """Loads torchvision ImageNet weights for the ResNet from a local file (``fc`` is ignored).

        Raises:
            ValueError: The file does not hold weights of this model's backbone.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {
            k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))
        }
        reference = BACKBONES[self.config.backbone][0]()
        reference.fc = nn.Identity()
        try:
            reference.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise ValueError(f"{path}: not torchvision {self.config.backbone} weights ({first})") from err
        cp = self.context_path
        cp.stem.load_state_dict(nn.Sequential(reference.conv1, reference.bn1).state_dict())
        for name in ("layer1", "layer2", "layer3", "layer4"):
            getattr(cp, name).load_state_dict(getattr(reference, name).state_dict())
