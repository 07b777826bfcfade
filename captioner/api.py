"""The Python API: ``Captioner.load(path).caption(images)``.

>>> cap = Captioner.load()                      # the shipped default model
>>> result = cap.caption("dog.jpg", beam_size=3)
>>> result.text, result.tokens, result.attention.shape   # (T, H, W)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch

from . import checkpoint
from . import runtime as runtimes
from .concepts import Concept, ConceptEncoder, ConceptMap, ImageNetHead, show_placed
from .constrained import constrained_beam_search
from .decoder import AttentionDecoder, DecoderConfig
from .encoder import Encoder, EncoderConfig
from .images import DEFAULT_MAX_PIXELS, ImageSource, load_image, preprocess
from .perf import ONE_THREAD_BATCH, intra_op_threads
from .search import Hypothesis, best_hypotheses
from .settings import CAPTION_BATCH, GUIDANCE, MAX_BEAM_SIZE, MAX_LENGTH_LIMIT, default_model_path, parse_flag
from .vocab import Vocabulary

#: Concepts reported with a caption: at most this many, each at least this likely.
CONCEPTS_SHOWN, CONCEPT_MIN_PROB = 5, 0.1


@dataclass
class Caption:
    """A generated caption with per-word log-probabilities and attention grids."""

    text: str
    tokens: list[str]
    logprobs: list[float]
    attention: np.ndarray  # (T, H, W): one grid per token, each summing to 1
    score: float
    finished: bool = True
    alternatives: list[Caption] = field(default_factory=list)
    concepts: list[Concept] = field(default_factory=list)  # what the ImageNet classifier sees, best first

    def to_dict(
        self, attention: bool = True, overlays: Sequence[str] | None = None, complete: bool = False
    ) -> dict[str, Any]:
        """The caption's one JSON form: the service's answers and the CLI's records are built from it.

        Scores and log-probabilities are rounded to 4 decimals, attention grids to 6 (from float64, so the
        JSON holds short decimals). ``attention`` puts each token's (H, W) grid next to it, ``overlays``
        one string per token (the service's PNG data URIs). ``complete`` (the service) adds ``grid`` =
        [H, W] and lists ``alternatives`` even when empty; otherwise (the CLI) they appear only with n-best.
        """
        tokens: list[dict[str, Any]] = []
        for t, (word, logprob) in enumerate(zip(self.tokens, self.logprobs)):
            token: dict[str, Any] = {"word": word, "logprob": round(float(logprob), 4)}
            if attention:
                token["attention"] = np.round(np.asarray(self.attention[t], dtype=np.float64), 6).tolist()
            if overlays is not None:
                token["overlay"] = overlays[t]
            tokens.append(token)
        out: dict[str, Any] = {"caption": self.text, "score": round(float(self.score), 4), "tokens": tokens}
        if complete:
            out["grid"] = [int(n) for n in self.attention.shape[1:]]
        if self.alternatives or complete:
            out["alternatives"] = [{"caption": a.text, "score": round(float(a.score), 4)} for a in self.alternatives]
        out["concepts"] = [c.to_dict() for c in self.concepts]
        return out


class Captioner:
    """Encoder + decoder + vocabulary, ready to caption images on CPU or GPU.

    For an EfficientNet-Lite checkpoint ``encoder`` is a :class:`~captioner.concepts.ConceptEncoder`:
    the caption encoder (its ``.encoder``) plus the packaged ImageNet head on the shared trunk.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: AttentionDecoder,
        vocab: Vocabulary,
        config: dict,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.decoder = decoder.to(self.device).eval()
        self.vocab = vocab
        self.config = config
        self.encoder_cfg: EncoderConfig = encoder.config
        self.defaults: dict[str, Any] = {
            "beam_size": 3,
            "max_length": 30,
            "length_alpha": 0.0,
            "block_repeats": True,
            "guidance": "concepts",
            "concept_threshold": 0.1,
            "concept_weight": 16.0,
            "concept_top": 2,
            "concept_lift": 2.0,
            "concept_pair": 1.0,
            "concept_scene": True,
            "concept_apart": True,
            "concept_margin": 6.0,
            "concept_places": True,
        }
        self.defaults.update(config.get("inference", {}))
        # visual concepts need the encoder's ImageNet head (EfficientNet-Lite, head stage), in torch or ONNX
        concepts = isinstance(encoder, ConceptEncoder) or getattr(encoder, "concepts", False)
        self.concept_map: ConceptMap | None = ConceptMap.load(vocab.itos) if concepts else None
        self.concept_head: ImageNetHead | None = encoder.head if isinstance(encoder, ConceptEncoder) else None
        self.optimizations: list[str] = []  # CPU speed-ups applied by captioner.perf.optimize

    @property
    def caption_encoder(self) -> Encoder:
        """The encoder whose annotation grid the decoder reads (without the ImageNet head)."""
        return self.encoder.encoder if isinstance(self.encoder, ConceptEncoder) else self.encoder

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        fast: bool | None = None,
        runtime: str | None = None,
    ) -> Captioner:
        """Load a checkpoint folder (safetensors + JSON; never unpickles). ``device`` defaults to CUDA if present.

        ``fast`` (default: on for CPU unless ``$CAPTIONER_FAST`` is 0, false, no, off or empty) applies the CPU
        inference speed-ups measured in BENCHMARKS.md: batch norms folded into convolutions, channels-last encoder,
        encoder run two images at a time, int8 decoder weights. Use ``fast=False`` for the model
        exactly as trained (e.g. to save or fine-tune its weights).

        ``runtime`` (default ``$CAPTIONER_RUNTIME``, else ``auto``): on the fast CPU path ``auto`` runs the
        encoder with ONNX Runtime when it is installed and the folder has a fresh exported encoder
        (``encoder.onnx``, or ``encoder-int8.onnx`` as shipped)
        (:mod:`captioner.runtime`), else torch; ``torch`` always torch; ``onnx`` raises if it cannot.
        :attr:`runtime` names what runs.
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        folder = checkpoint.resolve(path or default_model_path())
        try:
            config = checkpoint.read_config(folder)
            vocab = Vocabulary.load(folder / checkpoint.VOCAB)
            enc_cfg = EncoderConfig(**config["encoder"])
            dec_cfg = DecoderConfig(**config["decoder"])
        except checkpoint.CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # malformed config.json / vocab.json
            raise checkpoint.CheckpointError(
                f"{folder} has an invalid config.json or vocab.json ({type(exc).__name__}: {exc})"
            ) from exc
        if dec_cfg.vocab_size != len(vocab):
            raise checkpoint.CheckpointError(
                f"vocabulary has {len(vocab)} words but the decoder expects {dec_cfg.vocab_size}"
            )
        if fast is None:
            fast = parse_flag(os.environ.get("CAPTIONER_FAST", "1"), "CAPTIONER_FAST")
        from .perf import optimize

        device = torch.device(device)
        exported = runtimes.open_encoder(folder, config, device, fast, runtime)
        weights = checkpoint.read_weights(folder, prefix="" if exported is None else "decoder.")
        if exported is not None:  # the encoder runs in ONNX Runtime: no torch encoder to build, no encoder weights
            decoder = AttentionDecoder(dec_cfg)
            checkpoint.load_decoder(decoder, weights, config)
            return optimize(cls(exported, decoder, vocab, config, device), int8_decoder=True)
        encoder = Encoder(enc_cfg, pretrained=True)
        n_top = int(config.get("finetune_blocks") or 0)
        # the ImageNet head runs the packaged last blocks on the shared trunk (built before fine-tuned weights load)
        with_concepts = enc_cfg.backbone.startswith("efficientnet-lite") and enc_cfg.stage == "head"
        head = ImageNetHead.packaged(encoder, n_top) if with_concepts else None
        decoder = AttentionDecoder(dec_cfg)
        checkpoint.load_decoder(decoder, weights, config)
        checkpoint.load_encoder(encoder, weights, n_top)  # fine-tuned blocks override the packaged ImageNet weights
        cap = cls(ConceptEncoder(encoder, head, n_top) if head is not None else encoder, decoder, vocab, config, device)
        if fast and cap.device.type == "cpu":
            optimize(cap, fold_bn=True, channels_last=True, encode_chunk=2, int8_decoder=True)
        return cap

    @property
    def runtime(self) -> str:
        """What runs the encoder: ``torch``, or ``onnxruntime-fp32``/``-int8`` (exported graph, captioner.runtime)."""
        return str(getattr(self.encoder, "runtime", runtimes.TORCH))

    @property
    def name(self) -> str:
        return str(self.config.get("name", "captioner"))

    @property
    def version(self) -> str:
        return str(self.config.get("version", "0"))

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder_cfg.grid

    # ---------------------------------------------------------------- stages
    def preprocess(
        self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Any image source -> (tensor (3, S, S), original (width, height)). Raises ImageError."""
        img = load_image(source, max_pixels=max_pixels, draft_size=self.encoder_cfg.image_size)
        return preprocess(img, self.encoder_cfg.image_size, self.encoder_cfg.norm), img.info.get(
            "original_size", img.size
        )

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> annotations (B, L, D)."""
        return self.see(images)[0]

    @torch.inference_mode()
    def see(self, images: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, list[list[Concept]] | None]:
        """images (B, 3, S, S) -> annotations (B, L, D) and each image's concepts (None without a concept head).

        ``threads``: run an ONNX Runtime encoder on that many intra-op threads (None: as loaded), e.g. one while
        another thread decodes (the service's micro-batcher); it keeps a session per count, with bit-identical
        outputs. The torch encoder runs as loaded: its convolutions round differently on another thread count.
        """
        if isinstance(self.encoder, runtimes.OnnxEncoder):
            out = self.encoder(images, threads=threads)
        else:
            out = self.encoder(images.to(self.device))
        if self.concept_map is None:
            return out, None
        annotations, class_probs = out  # (B, L, D), (B, 1000)
        return annotations, self.concept_map.concepts(class_probs, CONCEPTS_SHOWN, CONCEPT_MIN_PROB)

    @torch.inference_mode()
    def concepts_from_trunk(self, trunk: torch.Tensor) -> list[list[Concept]]:
        """Trunk maps (B, C, h, w) before the last ``finetune_blocks`` blocks (a trunk cache) -> concepts."""
        if self.concept_head is None or self.concept_map is None:
            raise ValueError(f"{self.name} has no ImageNet head for concepts")
        class_probs = torch.softmax(self.concept_head(trunk.to(self.device).float()).float(), dim=-1)  # (B, 1000)
        return self.concept_map.concepts(class_probs, CONCEPTS_SHOWN, CONCEPT_MIN_PROB)

    @torch.inference_mode()
    def decode(
        self,
        annotations: torch.Tensor,
        beam_size: int | None = None,
        max_length: int | None = None,
        n_best: int = 1,
        length_alpha: float | None = None,
        concepts: list[list[Concept]] | None = None,
        guidance: str | None = None,
    ) -> list[Caption]:
        """annotations (B, L, D) -> one Caption per image (``n_best - 1`` alternatives attached).

        ``concepts`` (from :meth:`see`) are attached to the captions; with ``guidance="concepts"``
        (the default) an image with confident concepts gets a caption that satisfies its constraints
        (:meth:`ConceptMap.constraints`: an object, and with ``concept_scene`` a place) each at most once
        (:func:`~captioner.constrained.constrained_beam_search`, beam size at least 2; a novel word through its
        proxy, shown by :func:`~captioner.concepts.show_placed`): of the best captions satisfying each subset
        of them, the one whose score plus ``concept_weight`` x the probability of what it satisfies is highest;
        with ``concept_apart`` no constraint's word comes right after another's ("a kitchen microwave"), and a
        constraint's word goes only where its log-probability is within ``concept_margin`` of the step's best word's;
        with ``concept_places`` a place word (kitchen, table) comes only right after a preposition and an article.
        """
        beam_size = int(self.defaults["beam_size"] if beam_size is None else beam_size)
        max_length = int(self.defaults["max_length"] if max_length is None else max_length)
        alpha = self.defaults["length_alpha"] if length_alpha is None else length_alpha
        guidance = str(self.defaults["guidance"] if guidance is None else guidance)
        check_limits(beam_size, max_length, n_best)
        check_guidance(guidance)
        v = self.vocab
        common = dict(
            start_id=v.start_id,
            end_id=v.end_id,
            pad_id=v.pad_id,
            max_length=max_length,
            block_repeats=bool(self.defaults["block_repeats"]),
            unk_id=v.unk_id,
        )
        annotations = annotations.to(self.device)
        required, allowance, shown = (
            self.concept_map.constraints(concepts, v.stoi, len(v), self.defaults)
            if guidance == "concepts" and concepts and self.concept_map is not None
            else (None, None, [{} for _ in range(annotations.shape[0])])
        )
        # a small batch beside ONNX Runtime's own thread pool decodes on one thread (perf.intra_op_threads)
        small = self.runtime != runtimes.TORCH and self.device.type == "cpu" and len(annotations) <= ONE_THREAD_BATCH
        with intra_op_threads(1 if small else None):
            if required is not None and bool(required.any()):
                hyps = constrained_beam_search(
                    self.decoder,
                    annotations,
                    required,
                    beam_size=max(beam_size, n_best, 2),
                    length_alpha=alpha,
                    n_best=n_best,
                    allowance=allowance,
                    apart=bool(self.defaults["concept_apart"]),
                    margin=None if self.defaults["concept_margin"] is None else float(self.defaults["concept_margin"]),
                    places=self.concept_map.places(required, v.stoi) if self.defaults["concept_places"] else None,
                    **common,
                )
            else:
                hyps = best_hypotheses(
                    self.decoder, annotations, beam_size=beam_size, length_alpha=alpha, n_best=n_best, **common
                )
        return [self._to_caption(h, cs, sh) for h, cs, sh in zip(hyps, concepts or [[] for _ in hyps], shown)]

    def _to_caption(self, hyps: list[Hypothesis], concepts: list[Concept], shown: dict[str, str]) -> Caption:
        H, W = self.grid
        caps = []
        for h in hyps:
            words = show_placed([self.vocab.itos[i] for i in h.ids], shown)
            attn = h.alphas.reshape(len(words), H, W).numpy().astype(np.float32)  # (T, H, W)
            caps.append(Caption(" ".join(words), words, h.logprobs, attn, h.score, h.finished))
        best = caps[0]
        best.alternatives = caps[1:]
        best.concepts = list(concepts)
        return best

    # ---------------------------------------------------------------- one call
    @overload
    def caption(self, images: ImageSource, **kwargs: Any) -> Caption: ...
    @overload
    def caption(self, images: Sequence[ImageSource], **kwargs: Any) -> list[Caption]: ...

    def caption(
        self,
        images: ImageSource | Sequence[ImageSource],
        beam_size: int | None = None,
        max_length: int | None = None,
        n_best: int = 1,
        length_alpha: float | None = None,
        batch_size: int = CAPTION_BATCH,
        guidance: str | None = None,
    ) -> Caption | list[Caption]:
        """Caption one image (path, bytes, file object or PIL image) or a list of them.

        Lists are processed in batches of ``batch_size``: one encoder pass and one
        batched beam search per batch. Raises ImageError for an unreadable image.
        ``guidance="none"`` gives the plain model's caption (see :meth:`decode`).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        out: list[Caption] = []
        for i in range(0, len(items), batch_size):
            batch = torch.stack([self.preprocess(x)[0] for x in items[i : i + batch_size]])  # (b, 3, S, S)
            annotations, concepts = self.see(batch)
            out += self.decode(annotations, beam_size, max_length, n_best, length_alpha, concepts, guidance)
        return out[0] if single else out


def check_limits(beam_size: int, max_length: int, n_best: int) -> None:
    """Reject decoding settings outside the documented bounds (ValueError)."""
    if not 1 <= beam_size <= MAX_BEAM_SIZE:
        raise ValueError(f"beam_size must be between 1 and {MAX_BEAM_SIZE}")
    if not 1 <= max_length <= MAX_LENGTH_LIMIT:
        raise ValueError(f"max_length must be between 1 and {MAX_LENGTH_LIMIT}")
    if not 1 <= n_best <= MAX_BEAM_SIZE:
        raise ValueError(f"n_best must be between 1 and {MAX_BEAM_SIZE}")


def check_guidance(guidance: str) -> None:
    """Reject an unknown ``guidance`` value (ValueError)."""
    if guidance not in GUIDANCE:
        raise ValueError(f"guidance must be one of {', '.join(GUIDANCE)}")
