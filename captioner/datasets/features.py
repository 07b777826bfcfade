"""Feature cache: run the frozen encoder once per image and keep the grids on disk.

A cache is a folder with ``features.npy`` (float16, (N, L, D), memory-mapped),
``index.json`` (image paths in row order, the encoder config, rows done) so that
an interrupted extraction resumes where it stopped and a cache built for another
encoder is never reused by mistake.

A *trunk* cache (``trunk_blocks=n``) stores the feature map before the encoder's last
``n`` blocks instead, as rows (N, H*W, C): fine-tuning those blocks then trains from the
cache too (``captioner train --finetune-blocks n``).

:func:`cached_features` is what training and evaluation call: the cache for a list of records,
built when missing; :func:`records_from_trunk` finishes trunk rows with a fine-tuned encoder's top.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..batch import ImageFiles, collate, single_thread_worker
from ..encoder import Encoder, EncoderConfig, TrunkRows
from ..progress import bar_disabled
from .records import CaptionRecord


def cache_identity(cfg: EncoderConfig, trunk_blocks: int = 0) -> dict:
    """What a cache's rows depend on besides the images: the encoder, and where it is cut."""
    return cfg.to_dict() | ({"trunk_blocks": trunk_blocks} if trunk_blocks else {})


def cache_key(paths: list[str], cfg: EncoderConfig, trunk_blocks: int = 0) -> str:
    """Short hash naming a cache for this encoder (cut ``trunk_blocks`` from the end) and image set."""
    h = hashlib.sha1(json.dumps(cache_identity(cfg, trunk_blocks), sort_keys=True).encode())
    for p in paths:
        h.update(os.path.abspath(p).encode())
    return h.hexdigest()[:12]


class FeatureCache:
    """Row-per-image store of encoder grids, float16, memory-mapped."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index_path = self.folder / "index.json"
        self.array_path = self.folder / "features.npy"

    @property
    def index(self) -> dict:
        return json.loads(self.index_path.read_text()) if self.index_path.exists() else {}

    def complete(self) -> bool:
        idx = self.index
        return bool(idx) and idx.get("done", 0) >= len(idx.get("paths", [])) and self.array_path.exists()

    def build(
        self,
        paths: list[str],
        encoder: Encoder,
        batch_size: int = 32,
        num_workers: int = 1,
        device: str | torch.device = "cpu",
        progress: bool = True,
        trunk_blocks: int = 0,
        row_shape: tuple[int, int] | None = None,
    ) -> None:
        """Encode ``paths`` (resuming a partial cache with the same paths and encoder).

        ``encoder`` maps images to rows (b, L, D); for a trunk cache it is the encoder's
        :class:`~captioner.encoder.TrunkRows` view and ``row_shape`` gives its (L, C).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = encoder.config
        H, W = cfg.grid
        shape = (len(paths), *(row_shape or (H * W, cfg.feature_dim)))
        identity = cache_identity(cfg, trunk_blocks)
        idx = self.index
        resumable = (
            idx.get("paths") == [os.path.abspath(p) for p in paths]
            and idx.get("encoder") == identity
            and self.array_path.exists()
        )
        if resumable:
            arr = np.load(self.array_path, mmap_mode="r+")
            start = int(idx.get("done", 0))
        else:
            arr = np.lib.format.open_memmap(self.array_path, mode="w+", dtype=np.float16, shape=shape)
            start = 0
            idx = {
                "paths": [os.path.abspath(p) for p in paths],
                "encoder": identity,
                "done": 0,
                "shape": list(shape),
                "failed": [],
            }
            self._write_index(idx)
        if start >= len(paths):
            return
        encoder = encoder.to(device).eval()
        loader = DataLoader(
            ImageFiles(paths[start:], cfg),  # the one image-files dataset (batch captioning uses it too)
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
            worker_init_fn=single_thread_worker,
        )
        row = start
        bar = tqdm(total=len(paths), initial=start, desc="encoding images", unit="img", disable=bar_disabled(progress))
        with torch.inference_mode():
            for batch in loader:
                feats = np.zeros((len(batch.paths), *shape[1:]), dtype=np.float16)  # a failed image's row stays 0
                if batch.images is not None:
                    good = encoder(batch.images.to(device)).float().cpu().numpy()  # (b_ok, L, D)
                    if good.shape[1:] != shape[1:]:
                        raise RuntimeError(f"encoder produced {good.shape[1:]}, cache expects {shape[1:]}")
                    feats[batch.ok] = good.astype(np.float16)
                arr[row : row + len(feats)] = feats
                idx["failed"] += [batch.paths[k] for k in sorted(batch.errors)]
                row += len(feats)
                arr.flush()
                idx["done"] = row
                self._write_index(idx)
                bar.update(len(feats))
        bar.close()
        del arr

    def load(self) -> tuple[torch.Tensor, dict[str, int]]:
        """All features as a float16 tensor (N, L, D) in RAM, and path -> row."""
        if not self.complete():
            raise RuntimeError(f"feature cache {self.folder} is incomplete; build it first")
        arr = np.load(self.array_path)
        rows = {p: i for i, p in enumerate(self.index["paths"])}
        return torch.from_numpy(arr), rows

    def _write_index(self, idx: dict) -> None:
        tmp = self.index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(idx))
        os.replace(tmp, self.index_path)


def cached_features(
    records: list[CaptionRecord],
    enc_cfg: EncoderConfig,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 32,
    num_workers: int = 1,
    encoder: Encoder | None = None,
    trunk_blocks: int = 0,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Encode ``records``' images once (resumable) and return (features (N, L, D) fp16, path -> row).

    With ``trunk_blocks`` n > 0 the rows are the map before the encoder's last n blocks,
    (N, H*W, C), for :meth:`Encoder.top` to finish (encoder fine-tuning).
    """
    paths = sorted({os.path.abspath(r.path) for r in records})
    identity = cache_identity(enc_cfg, trunk_blocks)
    cache = FeatureCache(cache_dir / f"features-{cache_key(paths, enc_cfg, trunk_blocks)}")
    if not cache.complete():
        # a complete cache of the same encoder that already holds every image will do (e.g. the
        # train+dev cache when evaluating on dev)
        for other in sorted(cache_dir.glob("features-*")):
            candidate = FeatureCache(other)
            idx = candidate.index
            if candidate.complete() and idx.get("encoder") == identity and set(paths) <= set(idx["paths"]):
                return candidate.load()
    if not cache.complete():
        encoder = encoder or Encoder(enc_cfg)
        row_shape = None
        module: torch.nn.Module = encoder
        if trunk_blocks:
            c, h, w = encoder.trunk_shape(trunk_blocks)
            row_shape, module = (h * w, c), TrunkRows(encoder, trunk_blocks)
        if torch.device(device).type == "cpu":  # folded BN + channels-last + chunks of 2: same features, faster
            from ..perf import fast_encoder

            module = fast_encoder(module)
        cache.build(
            paths,
            module,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            trunk_blocks=trunk_blocks,
            row_shape=row_shape,
        )
    return cache.load()


def top_features(
    encoder: Encoder,
    trunk_feats: torch.Tensor,
    n_top: int,
    device: torch.device | str,
    batch_size: int = 64,
) -> torch.Tensor:
    """Trunk-cache rows (N, H*W, C) -> annotations (N, L, D) fp16 through the encoder's last ``n_top`` blocks."""
    c, h, w = encoder.trunk_shape(n_top)
    out = []
    with torch.inference_mode():
        for i in range(0, len(trunk_feats), batch_size):
            x = trunk_feats[i : i + batch_size].to(device).float()  # (b, H*W, C)
            out.append(encoder.top(x.transpose(1, 2).reshape(-1, c, h, w), n_top).cpu().half())
    return torch.cat(out)


def records_from_trunk(
    encoder: Encoder,
    trunk: torch.Tensor,
    trunk_rows: dict[str, int],
    records: list[CaptionRecord],
    n_top: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, dict[str, int]]:
    """``records``' trunk-cache rows through the encoder's last ``n_top`` blocks.

    Returns (annotations (N, L, D), path -> row), in the order of ``records``.
    """
    paths = [os.path.abspath(r.path) for r in records]
    feats = top_features(encoder, trunk[torch.tensor([trunk_rows[p] for p in paths])], n_top, device)
    return feats, {p: i for i, p in enumerate(paths)}
