"""`captioner caption` against the sgrvinod-style per-image pipeline, on the same photos, in one run.

    .venv/bin/python bench/bench_anchor.py --images ../shared/data/flickr8k/images \
        --split ../shared/data/flickr8k/Flickr_8k.testImages.txt --n 100 --rounds 3

The anchor is the widely copied "Show, Attend and Tell" tutorial pipeline (sgrvinod's
a-PyTorch-Tutorial-to-Image-Captioning), written here from its description, with random weights
(timing only): PIL decode, resize to 256×256, ImageNet normalisation, torchvision ResNet-101 without
its last two layers, adaptive average pooling to 14×14, then a beam search with k=3 on one image
at a time: an LSTMCell decoder (embedding 512, attention 512, hidden 512, a sigmoid β gate on the
attention-weighted encoding, vocabulary 2,500) run for ``--anchor-steps`` steps (random weights
never emit ``<end>``, so the step count is fixed to a typical caption length).

Each round runs the CLI (a fresh process, so its start-up is included, as a user sees it) and
then the anchor (in this process, model construction excluded: generous to the anchor) on the
same photos; the ratio of their images/s is taken within the round. JSON goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class AnchorEncoder(nn.Module):
    """ResNet-101 without its pooling and classifier, pooled to a 14×14 grid."""

    def __init__(self, grid: int = 14) -> None:
        super().__init__()
        import torchvision

        resnet = torchvision.models.resnet101(weights=None)
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])
        self.pool = nn.AdaptiveAvgPool2d((grid, grid))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 256, 256) -> (B, 14, 14, 2048)."""
        return self.pool(self.resnet(images)).permute(0, 2, 3, 1)  # (B, 14, 14, 2048)


class AnchorDecoder(nn.Module):
    """The tutorial's DecoderWithAttention: soft attention, β gate, LSTMCell."""

    def __init__(
        self, vocab: int = 2500, embed: int = 512, attn: int = 512, hidden: int = 512, enc: int = 2048
    ) -> None:
        super().__init__()
        self.encoder_att, self.decoder_att, self.full_att = (
            nn.Linear(enc, attn),
            nn.Linear(hidden, attn),
            nn.Linear(attn, 1),
        )
        self.embedding = nn.Embedding(vocab, embed)
        self.decode_step = nn.LSTMCell(embed + enc, hidden)
        self.init_h, self.init_c = nn.Linear(enc, hidden), nn.Linear(enc, hidden)
        self.f_beta = nn.Linear(hidden, enc)
        self.fc = nn.Linear(hidden, vocab)

    def attend(self, enc: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """enc (k, L, E), h (k, H) -> attention-weighted encoding (k, E); the tutorial projects enc every step."""
        att = self.full_att(torch.relu(self.encoder_att(enc) + self.decoder_att(h).unsqueeze(1))).squeeze(2)  # (k, L)
        alpha = torch.softmax(att, dim=1)  # (k, L)
        return (enc * alpha.unsqueeze(2)).sum(dim=1)  # (k, E)


@torch.inference_mode()
def anchor_beam_search(dec: AnchorDecoder, grid: torch.Tensor, k: int, steps: int, start_id: int = 1) -> list[int]:
    """One image's grid (1, 14, 14, E) -> word ids: the tutorial's caption.py beam search, ``steps`` steps."""
    vocab = dec.fc.out_features
    enc = grid.reshape(1, -1, grid.shape[-1]).expand(k, -1, -1)  # (k, L, E)
    prev = torch.full((k,), start_id, dtype=torch.long)  # (k,)
    seqs = prev.unsqueeze(1)  # (k, 1)
    top = torch.zeros(k, 1)  # (k, 1)
    mean = enc.mean(dim=1)  # (k, E)
    h, c = dec.init_h(mean), dec.init_c(mean)  # (k, H) each
    for step in range(steps):
        emb = dec.embedding(prev)  # (k, M)
        awe = torch.sigmoid(dec.f_beta(h)) * dec.attend(enc, h)  # (k, E)
        h, c = dec.decode_step(torch.cat([emb, awe], dim=1), (h, c))  # (k, H) each
        scores = top.expand(-1, vocab) + torch.log_softmax(dec.fc(h), dim=1)  # (k, V)
        best, idx = (scores[0] if step == 0 else scores.view(-1)).topk(k)  # (k,) each
        origin, prev = idx // vocab, idx % vocab  # (k,) each
        seqs = torch.cat([seqs[origin], prev.unsqueeze(1)], dim=1)  # (k, t + 2)
        h, c, top = h[origin], c[origin], best.unsqueeze(1)
    return seqs[0].tolist()


def anchor_preprocess(path: Path) -> torch.Tensor:
    """PIL decode, resize to 256×256, ImageNet normalisation -> (1, 3, 256, 256)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as src:
        img = src.convert("RGB").resize((256, 256), Image.BILINEAR)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # (256, 256, 3)
    arr = (arr - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return arr.permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, 256, 256)


@torch.inference_mode()
def run_anchor(encoder: AnchorEncoder, decoder: AnchorDecoder, paths: list[Path], k: int, steps: int) -> float:
    """Seconds to caption ``paths`` one image at a time."""
    t0 = time.perf_counter()
    for path in paths:
        anchor_beam_search(decoder, encoder(anchor_preprocess(path)), k, steps)
    return time.perf_counter() - t0


def run_cli(paths: list[Path], checkpoint: str | None, out_dir: Path) -> float:
    """Seconds for a fresh ``captioner caption`` process (defaults) on ``paths``, start-up included."""
    out = out_dir / "captions.jsonl"
    out.unlink(missing_ok=True)
    cmd = [str(Path(sys.executable).parent / "captioner"), "caption", "-q", "-o", str(out), *map(str, paths)]
    if checkpoint:
        cmd[2:2] = ["--checkpoint", checkpoint]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    if sum(1 for _ in out.open()) != len(paths):
        raise SystemExit(f"the CLI wrote fewer than {len(paths)} records to {out}")
    return seconds


def pick_photos(folder: Path, split: Path | None, n: int) -> list[Path]:
    names = split.read_text().split() if split else sorted(p.name for p in folder.glob("*.jpg"))
    paths = [folder / name for name in names[:n] if (folder / name).is_file()]
    if len(paths) < n:
        raise SystemExit(f"only {len(paths)} of {n} photos found in {folder}")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="folder of JPEG photos")
    ap.add_argument("--split", help="file listing the photo names to use, in order (default: sorted folder)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpoint", help="the CLI's --checkpoint (default: the shipped model)")
    ap.add_argument("--beam-size", type=int, default=3)
    ap.add_argument("--anchor-steps", type=int, default=13)
    args = ap.parse_args()
    paths = pick_photos(Path(args.images), Path(args.split) if args.split else None, args.n)
    torch.manual_seed(0)
    encoder, decoder = AnchorEncoder().eval(), AnchorDecoder().eval()
    run_anchor(encoder, decoder, paths[:2], args.beam_size, args.anchor_steps)  # warm-up
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            load = os.getloadavg()[0]
            cli_s = run_cli(paths, args.checkpoint, Path(tmp))
            anchor_s = run_anchor(encoder, decoder, paths, args.beam_size, args.anchor_steps)
            rounds.append(
                {
                    "round": r,
                    "load1": round(load, 2),
                    "cli_img_s": round(len(paths) / cli_s, 2),
                    "anchor_img_s": round(len(paths) / anchor_s, 2),
                    "ratio": round(anchor_s / cli_s, 2),
                }
            )
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    result = {
        "bench": "anchor",
        "n": len(paths),
        "beam_size": args.beam_size,
        "anchor_steps": args.anchor_steps,
        "machine": machine(),
        "rounds": rounds,
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
