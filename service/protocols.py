"""What the service needs of its model and of its micro-batcher, as Protocols.

A :class:`captioner.Captioner` is a :class:`ServedModel`; a :class:`~service.batching.MicroBatcher`
is a :class:`Batcher`. Tests hand in stand-ins (a captioner whose encoder pass waits on a gate, a
model that records its calls) that satisfy the same Protocols (tests/test_service_typing.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from captioner.api import Caption
    from captioner.concepts import Concept
    from captioner.encoder import EncoderConfig

    from .batching import BatchResult, DecodeSettings


@runtime_checkable
class BatchModel(Protocol):
    """The two stages the micro-batcher runs: one encoder pass per batch, one decode per settings group."""

    def see(self, images: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, list[list[Concept]] | None]:
        """images (B, 3, S, S) -> annotations (B, L, D) and each image's concepts (None without a concept head);
        ``threads``: intra-op threads for this pass (None: as loaded)."""
        ...

    def decode(
        self,
        annotations: torch.Tensor,
        beam_size: int,
        max_length: int,
        n_best: int,
        concepts: list[list[Concept]] | None = None,
        guidance: str | None = None,
    ) -> Sequence[Caption]:
        """annotations (b, L, D) -> one caption per image."""
        ...


@runtime_checkable
class ServedModel(BatchModel, Protocol):
    """The model as the service uses it: the batcher's stages plus what responses and /readyz report.

    Read-only properties, so that a plain attribute of a more specific type (``dict``) satisfies them.
    """

    @property
    def encoder_cfg(self) -> EncoderConfig:
        """image_size and norm for preprocessing."""
        ...

    @property
    def defaults(self) -> Mapping[str, Any]:
        """The checkpoint's decoding defaults: max_length, guidance, ..."""
        ...

    @property
    def optimizations(self) -> Sequence[str]:
        """CPU speed-ups applied (captioner.perf.optimize)."""
        ...

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


@runtime_checkable
class Batcher(Protocol):
    """The request threads' side of the micro-batcher."""

    @property
    def queue_size(self) -> int:
        """Most requests that may wait."""
        ...

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        ...

    def incoming(self) -> AbstractContextManager[None]:
        """Wrap a request's decode/resize: the next batch may be held open for it."""
        ...

    def run(self, tensor: torch.Tensor, settings: DecodeSettings, timeout: float | None = None) -> BatchResult:
        """Submit one image (3, S, S) and wait for its caption."""
        ...

    def retry_after(self) -> int:
        """Seconds a refused client should wait."""
        ...

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking requests and fail the queued ones."""
        ...
