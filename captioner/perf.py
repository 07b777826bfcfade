"""Opt-in CPU inference speed-ups for a loaded :class:`~captioner.api.Captioner`.

    from captioner.perf import optimize
    cap = optimize(Captioner.load(), fold_bn=True, channels_last=True)

Nothing here runs unless called; the measurements behind each option are in BENCHMARKS.md
(``bench/bench_levers.py``). All options keep the weights' meaning: ``fold_bn`` and
``channels_last`` change results only by float rounding; ``int8_decoder`` (dynamic int8
quantisation of the decoder's Linear/LSTMCell layers) is lossy and changes some captions.
Apply them to inference models only (never before training or saving a checkpoint).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# (conv, batch norm) attribute pairs in EfficientNet-Lite's stem, blocks and head
_STEM_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))
_BLOCK_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode batch norm into the convolution before it (the conv gains a bias)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def fold_batchnorm(encoder: nn.Module) -> int:
    """Fold every batch norm of an EfficientNet-Lite encoder into its conv; returns how many were folded.

    The batch norms become ``nn.Identity`` so the encoder's forward runs one op less per conv.
    Other backbones are left alone (returns 0).
    """
    net = getattr(encoder, "net", encoder)
    if not hasattr(net, "_blocks"):
        return 0
    folded = 0
    owners = [(net, _STEM_PAIRS)] + [(block, _BLOCK_PAIRS) for block in net._blocks]
    for owner, pairs in owners:
        for conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fold_conv_bn(conv, bn)
                setattr(owner, bn_name, nn.Identity())
                folded += 1
    return folded


def use_channels_last(encoder: nn.Module) -> None:
    """Keep the encoder's weights and activations in channels-last (NHWC) memory layout."""
    encoder.to(memory_format=torch.channels_last)

    def to_nhwc(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        images = args[0]  # (B, 3, S, S)
        return (images.contiguous(memory_format=torch.channels_last), *args[1:])

    encoder.register_forward_pre_hook(to_nhwc)


def quantize_decoder(decoder: nn.Module) -> nn.Module:
    """A copy of the decoder with Linear/LSTMCell weights in int8 (dynamic quantisation, CPU only)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(decoder, {nn.Linear, nn.LSTMCell}, dtype=torch.qint8)


def optimize(cap: Any, fold_bn: bool = True, channels_last: bool = False, int8_decoder: bool = False,
             threads: int | None = None) -> Any:
    """Apply the chosen speed-ups to ``cap`` in place (CPU inference) and return it."""
    if threads:
        torch.set_num_threads(threads)
    if fold_bn:
        fold_batchnorm(cap.encoder)
    if channels_last:
        use_channels_last(cap.encoder)
    if int8_decoder:
        if cap.device.type != "cpu":
            raise ValueError("int8 dynamic quantisation runs on the CPU only")
        cap.decoder = quantize_decoder(cap.decoder).eval()
    return cap
