"""CPU inference speed-ups for a loaded :class:`~captioner.api.Captioner`.

    cap = Captioner.load(device="cpu", fast=False)   # the model exactly as trained
    optimize(cap, fold_bn=True, channels_last=True, encode_chunk=2, int8_decoder=True)

``Captioner.load`` applies all four on CPU by default (``fast=True``; ``$CAPTIONER_FAST=0`` turns
them off). The measurements behind each option are in BENCHMARKS.md (``bench/bench_levers.py``).
``fold_bn`` and ``channels_last`` change the encoder's output only by float rounding (< 1e-4),
``encode_chunk`` not at all; ``int8_decoder`` (dynamic int8 quantisation of the decoder's
Linear/LSTMCell weights) changes some captions, with dev-split scores within noise of fp32
(BENCHMARKS.md). For inference only: never train or save a model after this.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .api import Captioner

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
    nets = [getattr(encoder, "net", encoder), getattr(encoder, "head", None)]  # head: a ConceptEncoder's ImageNet head
    nets = [net for net in nets if hasattr(net, "_blocks")]
    folded = 0
    owners = [(net, _STEM_PAIRS) for net in nets] + [(block, _BLOCK_PAIRS) for net in nets for block in net._blocks]
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


class ChunkedEncoder(nn.Module):
    """Runs a wrapped encoder on at most ``chunk`` images at a time and concatenates the grids.

    On CPUs a large encoder batch is slower *per image* than a small one (its activations no
    longer fit in the caches), while the beam search still gains from large batches.
    """

    def __init__(self, encoder: nn.Module, chunk: int) -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        self.inner, self.chunk = encoder, chunk
        self.config = getattr(encoder, "config", None)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """images (B, 3, S, S) -> annotations (B, L, D), or each output of a multi-output encoder, concatenated."""
        if len(images) <= self.chunk:
            return self.inner(images)
        parts = [self.inner(part) for part in images.split(self.chunk)]
        if isinstance(parts[0], tuple):  # e.g. a ConceptEncoder's (annotations, class probabilities)
            return tuple(torch.cat(outs) for outs in zip(*parts))
        return torch.cat(parts)


def fast_encoder(encoder: nn.Module, chunk: int = 2) -> nn.Module:
    """A CPU-fast copy of a frozen encoder: batch norms folded, channels-last, ``chunk`` images at a time.

    Used to build feature caches (3.4 times the images/s of the plain encoder at batch 32, BENCHMARKS.md);
    the copy leaves ``encoder`` itself untouched. An already chunked encoder is returned as is.
    """
    if isinstance(encoder, ChunkedEncoder):
        return encoder
    fast = copy.deepcopy(encoder).eval()
    fold_batchnorm(fast)
    use_channels_last(fast)
    return ChunkedEncoder(fast, chunk).eval()


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (per output channel) and int8 activations (per row).

    ``torch.ao``'s dynamic quantisation scales the activations of the *whole batch* with one
    factor, so an image's caption would depend on which other images share its batch. Here each
    row is divided by its own largest magnitude first, and two anchor rows (+1, -1) pin the
    batch's range to [-1, 1], so every row is quantised the same way whatever else is in the
    batch; the row scale is multiplied back afterwards.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """weight (out, in) and bias (out,) of a Linear layer (or one of an LSTMCell's two products)."""
        super().__init__()
        weight = weight.detach().float()  # (out, in)
        scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (out,)
        with warnings.catch_warnings():  # quantized tensor types are deprecated upstream; fine in torch 2.14
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(
                weight, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8
            )
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.register_buffer("bias", bias.detach().float().clone() if bias is not None else None)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("_anchors", torch.tensor([[1.0], [-1.0]]).expand(2, self.in_features).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        rows = x.reshape(-1, self.in_features).float()  # (N, in)
        N = rows.shape[0]
        # the row's largest magnitude: max and -min are exact and cheaper than |rows| (a copy) or aminmax
        scale = torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_()).clamp_min_(1e-12)
        scaled = rows.new_empty(N + 2, self.in_features)  # (N + 2, in): the rows in [-1, 1], then the anchors
        torch.div(rows, scale, out=scaled[:N])
        scaled[N:] = self._anchors
        y = torch.ops.quantized.linear_dynamic(scaled, self._packed, True)[:N].mul_(scale)  # (N, out)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8LSTMCell(nn.Module):
    """An LSTMCell whose two matrix products run through :class:`Int8Linear`; gates stay float32."""

    def __init__(self, cell: nn.LSTMCell) -> None:
        super().__init__()
        self.hidden_size = cell.hidden_size
        self.ih = Int8Linear(cell.weight_ih, cell.bias_ih)
        self.hh = Int8Linear(cell.weight_hh, cell.bias_hh)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, I), (h, c) (B, H) each -> (h', c')."""
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, dim=1)  # (B, H) each, PyTorch's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


#: Batches of up to this many images decode on one torch thread when ONNX Runtime runs the encoder
#: (:meth:`captioner.api.Captioner.decode`, :func:`intra_op_threads`): the service's micro-batches (at most 8 by
#: default) and single images; the CLI's batches (32 by default) keep torch's threads.
ONE_THREAD_BATCH = 8


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run this thread's torch operations on ``n`` intra-op threads (None: as set), then restore the count.

    Beside ONNX Runtime, which keeps its own pool of spinning threads on the same cores, torch's second OpenMP
    thread makes the two pools take each other's cores: on 2 cores one image decoded in 59-82 ms with two
    torch threads and about 33 ms with one, while batches of 16 ran about 5% slower on one (BENCHMARKS.md).
    Captions do not depend on the thread count.
    """
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantize_decoder(decoder: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of the decoder (``inplace``: the decoder itself) whose Linear/LSTMCell layers use int8 weights (CPU only).

    Batch-invariant (see :class:`Int8Linear`): captions do not depend on batch composition.
    Embeddings, attention softmax and gates stay float32.
    """
    quantized = decoder if inplace else copy.deepcopy(decoder)
    for module in list(quantized.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear.from_linear(child))
            elif isinstance(child, nn.LSTMCell):
                setattr(module, child_name, Int8LSTMCell(child))
    return quantized.eval()


def optimize(
    cap: Captioner,
    fold_bn: bool = False,
    channels_last: bool = False,
    int8_decoder: bool = False,
    encode_chunk: int | None = None,
    threads: int | None = None,
) -> Captioner:
    """Apply the chosen speed-ups to ``cap`` in place (CPU inference) and return it.

    ``encode_chunk``: run the encoder on at most this many images at a time (see :class:`ChunkedEncoder`).
    """
    applied: list[str] = getattr(cap, "optimizations", [])
    if threads:
        torch.set_num_threads(threads)
    if fold_bn and fold_batchnorm(cap.encoder):
        applied.append("fold_bn")
    if channels_last:
        use_channels_last(cap.encoder)
        applied.append("channels_last")
    if encode_chunk:
        cap.encoder = ChunkedEncoder(cap.encoder, encode_chunk).eval()
        applied.append(f"encode_chunk{encode_chunk}")
    if int8_decoder:
        if cap.device.type != "cpu":
            raise ValueError("int8 dynamic quantisation runs on the CPU only")
        cap.decoder = quantize_decoder(cap.decoder, inplace=True).eval()  # the float layers are not kept
        applied.append("int8_decoder")
    cap.optimizations = applied
    return cap
