"""Evaluation: decode a split's images and score the captions against their references.

:func:`generate` and :func:`evaluate_split` decode annotation grids from a feature cache (training
validates with them each epoch); :func:`checkpoint_annotations` gives the grids a saved checkpoint
sees for a list of records (from the feature cache, through its own fine-tuned blocks where it has
them), and :func:`evaluate_checkpoint` scores a loaded checkpoint as ``captioner evaluate`` does: with an
exported encoder (ONNX Runtime) by captioning as ``captioner caption`` does (:func:`batch_captions`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from . import checkpoint
from . import runtime as runtimes
from .datasets import CaptionRecord, DatasetError
from .datasets.features import cached_features, records_from_trunk
from .decoder import AttentionDecoder
from .encoder import Encoder
from .metrics import score as score_metrics
from .progress import bar_disabled
from .search import best_hypotheses
from .vocab import Vocabulary

if TYPE_CHECKING:
    from .api import Captioner
    from .concepts import Concept


@torch.inference_mode()
def generate(
    decoder: AttentionDecoder,
    feats: torch.Tensor,
    vocab: Vocabulary,
    beam_size: int = 1,
    max_length: int = 30,
    length_alpha: float = 0.0,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    block_repeats: bool = True,
    progress: bool = False,
) -> list[str]:
    """Captions for annotation grids feats (N, L, D), decoded in batches."""
    decoder.eval()
    texts: list[str] = []
    common = dict(
        start_id=vocab.start_id,
        end_id=vocab.end_id,
        pad_id=vocab.pad_id,
        max_length=max_length,
        block_repeats=block_repeats,
        unk_id=vocab.unk_id,
    )
    for i in tqdm(range(0, len(feats), batch_size), desc="decoding", disable=bar_disabled(progress), unit="batch"):
        batch = feats[i : i + batch_size].to(device).float()  # (b, L, D)
        hyps = best_hypotheses(decoder, batch, beam_size=beam_size, length_alpha=length_alpha, **common)
        texts += [" ".join(vocab.itos[j] for j in h[0].ids) for h in hyps]
    return texts


def score_texts(
    texts: list[str], records: list[CaptionRecord], meteor: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """Score ``texts`` (one per record) against the records' references. Returns (metrics, id -> caption)."""
    hyps = {r.image_id: t for r, t in zip(records, texts)}
    metrics = score_metrics(hyps, {r.image_id: r.captions for r in records}, meteor=meteor)
    metrics |= {"distinct_captions": len(set(texts)), "images": len(texts)}
    return metrics, hyps


def evaluate_split(
    decoder: AttentionDecoder,
    feats: torch.Tensor,
    rows: dict[str, int],
    records: list[CaptionRecord],
    vocab: Vocabulary,
    beam_size: int,
    max_length: int = 30,
    length_alpha: float = 0.0,
    device: torch.device | str = "cpu",
    meteor: bool = False,
    block_repeats: bool = True,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Decode every record's image and score against its references. Returns (metrics, id -> caption)."""
    index = torch.tensor([rows[os.path.abspath(r.path)] for r in records])
    texts = generate(
        decoder,
        feats[index],
        vocab,
        beam_size,
        max_length,
        length_alpha,
        device=device,
        block_repeats=block_repeats,
        progress=progress,
    )
    return score_texts(texts, records, meteor)


@dataclass
class Annotations:
    """The annotation grids a checkpoint's decoder reads for a list of records."""

    feats: torch.Tensor  # (N, L, D)
    rows: dict[str, int]  # absolute image path -> row of feats
    trunk: torch.Tensor | None = None  # (N', h*w, C) trunk-cache rows (fine-tuned encoders with a recorded cut)
    trunk_rows: dict[str, int] | None = None  # absolute image path -> row of trunk


def checkpoint_annotations(cap: Captioner, folder: Path, records: list[CaptionRecord], cache_dir: Path) -> Annotations:
    """``records``' annotations as the checkpoint in ``folder`` (loaded as ``cap``) sees them, as in training.

    A frozen encoder's come from the feature cache (built when missing). Fine-tuning left the trunk at its ImageNet
    weights: the trunk's maps are cached (reused by later runs) and finished by the checkpoint's
    own last blocks, taken at full precision from ``folder``. A fine-tuned encoder without a record
    of where it was cut encodes each image whole.
    """
    n_top = int(cap.config.get("finetune_blocks") or 0)
    if cap.config.get("encoder_finetuned") and n_top:
        encoder = Encoder(cap.encoder_cfg)
        checkpoint.load_encoder(encoder, checkpoint.read_weights(folder), n_top)
        # the trunk comes from the packaged fp32 ImageNet weights, as in training (an export stores
        # the whole encoder in fp16)
        trunk, trunk_rows = cached_features(records, cap.encoder_cfg, cache_dir, cap.device, trunk_blocks=n_top)
        feats, rows = records_from_trunk(encoder.to(cap.device), trunk, trunk_rows, records, n_top, cap.device)
        return Annotations(feats, rows, trunk, trunk_rows)
    if cap.config.get("encoder_finetuned"):
        feats = torch.cat([cap.encode(cap.preprocess(r.path)[0][None]).cpu() for r in records])  # (N, L, D)
        return Annotations(feats, {os.path.abspath(r.path): i for i, r in enumerate(records)})
    # a frozen encoder is the packaged one: the cache builds its own copy (the loaded model's encoder may be
    # wrapped by CPU speed-ups that also return the ImageNet head's probabilities)
    feats, rows = cached_features(records, cap.encoder_cfg, cache_dir, cap.device)
    return Annotations(feats, rows)


def batch_captions(
    cap: Captioner, records: list[CaptionRecord], beam_size: int, max_length: int, length_alpha: float, guidance: str
) -> list[str]:
    """Each record's caption from :func:`captioner.batch.iter_captions`, the ``captioner caption`` path (its encoder
    runtime, batching and guidance): what an exported encoder gives, which no feature cache holds."""
    from .batch import iter_captions
    from .settings import default_workers

    texts = []
    results = iter_captions(
        cap, [r.path for r in records], workers=default_workers(), beam_size=beam_size, max_length=max_length,
        length_alpha=length_alpha, guidance=guidance,
    )  # fmt: skip
    for result in tqdm(results, total=len(records), desc="captioning", disable=bar_disabled(True), unit="img"):
        if result.caption is None:
            raise DatasetError(f"{result.path}: {result.error}")
        texts.append(result.caption.text)
    return texts


def record_concepts(cap: Captioner, records: list[CaptionRecord], annotations: Annotations) -> list[list[Concept]]:
    """Each record's visual concepts, as ``captioner caption`` finds them (the ImageNet head on the trunk)."""
    if annotations.trunk is None or annotations.trunk_rows is None:
        return [cap.see(cap.preprocess(r.path)[0][None])[1][0] for r in records]
    n_top = int(cap.config.get("finetune_blocks") or 0)  # the ImageNet head runs on the cached trunk
    c, h, w = Encoder(cap.encoder_cfg, pretrained=False).trunk_shape(n_top)
    index = torch.tensor([annotations.trunk_rows[os.path.abspath(r.path)] for r in records])
    maps = annotations.trunk[index]  # (N, h*w, C)
    maps = maps.float().transpose(1, 2).reshape(len(records), c, h, w)  # (N, C, h, w)
    return [x for i in range(0, len(maps), 64) for x in cap.concepts_from_trunk(maps[i : i + 64])]


def evaluate_checkpoint(
    cap: Captioner,
    folder: Path,
    records: list[CaptionRecord],
    cache_dir: Path,
    beam_size: int,
    max_length: int,
    length_alpha: float,
    guidance: str,
    meteor: bool = True,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Caption ``records`` with the checkpoint in ``folder`` (loaded as ``cap``) and score them.

    With an exported encoder the captions are ``captioner caption``'s (:func:`batch_captions`); otherwise the grids
    come from the feature cache (:func:`checkpoint_annotations`). With ``guidance="concepts"`` and a concept head the
    captions are decoded as ``captioner caption`` decodes them; otherwise plainly. Returns (metrics, id -> caption).
    """
    if cap.runtime != runtimes.TORCH:
        return score_texts(batch_captions(cap, records, beam_size, max_length, length_alpha, guidance), records, meteor)
    annotations = checkpoint_annotations(cap, folder, records, cache_dir)
    if guidance == "concepts" and cap.concept_map is not None:
        concepts = record_concepts(cap, records, annotations)
        index = torch.tensor([annotations.rows[os.path.abspath(r.path)] for r in records])
        feats = annotations.feats[index]  # (N, L, D) in record order
        texts = [
            c.text
            for i in range(0, len(records), 100)
            for c in cap.decode(
                feats[i : i + 100].float(), beam_size, max_length, 1, length_alpha, concepts[i : i + 100], guidance
            )
        ]
        return score_texts(texts, records, meteor)
    return evaluate_split(
        cap.decoder,
        annotations.feats,
        annotations.rows,
        records,
        cap.vocab,
        beam_size,
        max_length,
        length_alpha,
        cap.device,
        meteor=meteor,
        block_repeats=cap.defaults["block_repeats"],
        progress=True,
    )
