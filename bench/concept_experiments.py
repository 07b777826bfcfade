"""Issue-16 ideas measured on both dev sets, none shipped: regional concepts, object-first captions, and an
oracle that keeps people (and dogs) out of captions of photos that have none.

    python bench/sweep_concepts.py cache                       # once: the shipped encoder's outputs (a few minutes)
    python bench/concept_experiments.py regions [--output f.json]
    python bench/concept_experiments.py subject [--output f.json]
    python bench/concept_experiments.py people [--output f.json]

Both start from ``sweep_concepts.py``'s cache (annotation grids and ImageNet class probabilities of coco_mini and
Flickr8k dev) and score like it: coco_mini object recall / CIDEr-D / METEOR, Flickr8k dev BLEU-4 / METEOR.
The library is untouched; each row is the shipped defaults with one change.

``regions``: the ImageNet head sees the whole image only (its conv-head map, 9x9 at 260 px, averaged). Here the
same map is also averaged over five windows of ``--window`` cells (four corners and the centre, about 2/3 of each
side: multi-crop at the cost of five classifier rows), and a class's probability becomes
max(whole image, ``gamma`` x the best window's), optionally only for classes the whole image already gives
``gate`` or more, and optionally never for worn classes (clothing: WordNet's garment/clothing hyponyms, listed by
name in ``WORN``). Needs the torch encoder for the conv-head maps (about a minute).

``subject``: captions that start with the object ("a cup is sitting on a wooden table") instead of Flickr8k's
person or dog. For an image whose top confident object concept has p >= ``tau``, the beam search is run once more
with "a <object>" forced as its first two words (a scratch mask around ``captioner.search.mask_logprobs``), and that
caption replaces the guided one when its length-normalised score is within ``beta`` of it.

``people``: an upper bound for a person detector. On each photo whose five references use no person word
(``bench_coco_mini.PEOPLE``), those words are banned from the search; a second row also bans dog words where no
reference names a dog. Both dev sets, one image at a time, with a scratch mask around ``mask_logprobs``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_coco_mini import PEOPLE, SYNONYMS, invented_people, recall
from bench.sweep_concepts import SHARED, coco_sets, decode_all
from captioner import constrained, search
from captioner.api import CONCEPT_MIN_PROB, CONCEPTS_SHOWN, Captioner
from captioner.concepts import MAPPING_FILE, show_placed
from captioner.datasets import load_records
from captioner.metrics import score
from captioner.vocab import tokenize

# ImageNet classes under WordNet's clothing, garment, footwear and headdress synsets (the WordNet reader of
# scripts/make_concept_map.py, nouns whose hypernym closure meets them), by their names in the mapping file
WORN = (
    "abaya", "academic gown", "apron", "swimming cap", "military hat (bearskin or shako)", "bikini", "bolo tie",
    "poke bonnet", "bow tie", "bra", "bulletproof vest", "cardigan", "Christmas stocking", "clogs", "cowboy boot",
    "cowboy hat", "crash helmet", "diaper", "feather boa", "football helmet", "fur coat", "gown", "hoop skirt",
    "jeans", "T-shirt", "kimono", "knee pad", "lab coat", "slip-on shoe",
    "tights for gymnastics, a one-piece leotard, or a sport jersey", "one-piece bathing suit", "mask",
    "military uniform", "miniskirt", "mitten", "graduation cap", "overskirt", "pajamas", "Pickelhaube", "poncho",
    "sneaker", "sandal", "sarong", "seat belt", "shower cap", "sock", "sombrero", "stole scarf", "suit",
    "sweatshirt", "swim trunks / shorts", "trench coat", "vestment", "hair wig", "Windsor tie",
)  # fmt: skip


def worn_index() -> list[int]:
    """The class indices of ``WORN``."""
    classes = json.loads(resources.files("captioner.resources").joinpath(MAPPING_FILE).read_text(encoding="utf-8"))
    index = {c["name"]: c["index"] for c in classes["classes"]}
    return [index[name] for name in WORN]


def references() -> tuple[dict, dict, dict]:
    """coco_mini references and objects, Flickr8k dev references (file name keyed)."""
    _, coco_refs, objects = coco_sets(SHARED / "coco_mini")
    dev_refs = {Path(r.path).name: r.captions for r in load_records("flickr8k", SHARED / "flickr8k", "dev")}
    return coco_refs, objects, dev_refs


def figures(coco: dict[str, str], dev: dict[str, str], refs: tuple[dict, dict, dict]) -> dict[str, float]:
    coco_refs, objects, dev_refs = refs
    hit, n = recall(coco, objects)
    m, d = score(coco, coco_refs), score(dev, dev_refs)
    return {
        "recall": round(100 * hit / n, 1),
        "coco_cider_d": round(m["cider"], 1),
        "coco_meteor": round(m["meteor"] or 0, 2),
        "dev_bleu4": round(d["bleu4"], 2),
        "dev_meteor": round(d["meteor"] or 0, 2),
    }


@torch.inference_mode()
def head_maps(cap: Captioner, paths: list[Path], batch: int = 8) -> torch.Tensor:
    """paths -> the ImageNet head's conv-head maps (N, 1280, h, w), before its average pool (torch encoder)."""
    concept = cap.encoder.inner if hasattr(cap.encoder, "inner") else cap.encoder  # the ChunkedEncoder's model
    head, maps = concept.head, []
    for i in range(0, len(paths), batch):
        x = concept.encoder.trunk(torch.stack([cap.preprocess(p)[0] for p in paths[i : i + batch]]), concept.n_top)
        for block in head._blocks:
            x = block(x)  # (b, C, h, w)
        maps.append(head._swish(head._bn1(head._conv_head(x))).float().half())  # (b, 1280, h, w)
    return torch.cat(maps)


def window_probs(fc: torch.nn.Module, maps: torch.Tensor, k: int) -> torch.Tensor:
    """maps (N, C, h, w) -> each class's best probability over five k x k windows (corners, centre) (N, 1000)."""
    h, w = maps.shape[2:]
    c = (h - k) // 2
    corners = [(y, x) for y in (0, h - k) for x in (0, w - k)] + [(c, c)]
    pooled = torch.stack([maps[:, :, y : y + k, x : x + k].float().mean((2, 3)) for y, x in corners], 1)  # (N, 5, C)
    return torch.softmax(fc(pooled), -1).amax(1)  # (N, 1000)


def regions(args: argparse.Namespace) -> list[dict]:
    refs = references()
    cached = {n: torch.load(Path(args.cache) / f"{n}.pt") for n in ("coco_mini", "flickr8k_dev")}
    torch_cap = Captioner.load(device="cpu", runtime="torch")
    coco_paths, _, _ = coco_sets(SHARED / "coco_mini")
    by_name = {p.name: p for p in coco_paths} | {
        Path(r.path).name: Path(r.path) for r in load_records("flickr8k", SHARED / "flickr8k", "dev")
    }
    fc = torch_cap.encoder.inner.head._fc
    windows = {}
    with torch.inference_mode():
        for part, data in cached.items():
            maps = head_maps(torch_cap, [by_name[n] for n in data["names"]])
            windows[part] = {k: window_probs(fc, maps, k) for k in (4, 5, 6)}
    cap = Captioner.load(device="cpu")
    variants = [("shipped", None, 0.0, 0.0, False)]
    variants += [(f"window {k}", k, 1.0, 0.0, False) for k in (4, 5, 6)]
    variants += [(f"window 6, gamma {g}", 6, g, 0.0, False) for g in (0.3, 0.4, 0.5, 0.7)]
    variants += [(f"window 6, gamma {g}, not worn", 6, g, 0.0, True) for g in (0.5, 1.0)]
    variants += [(f"window 6, gate {t}", 6, 1.0, t, False) for t in (0.02, 0.05)]
    rows = []
    for label, k, gamma, gate, not_worn in variants:
        texts, final = {}, {}
        for part, data in cached.items():
            probs = data["probs"]  # (N, 1000) whole image
            if k is not None:
                region = windows[part][k].clone()  # (N, 1000)
                if not_worn:
                    region[:, worn_index()] = 0.0
                if gate:
                    region *= probs >= gate
                probs = torch.maximum(probs, gamma * region)
            final[part] = probs
            texts[part] = decode_all(cap, {**data, "probs": probs})
        named = concept_pairs(cap, cached["coco_mini"]["names"], final["coco_mini"], refs[1])
        row = {"label": label, "concept_pairs": named, **figures(texts["coco_mini"], texts["flickr8k_dev"], refs)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def concept_pairs(cap: Captioner, names: list[str], probs: torch.Tensor, objects: dict[str, list[str]]) -> int:
    """coco_mini's (image, object) pairs whose object a confident concept names, before any decoding."""
    cmap = cap.concept_map
    assert cmap is not None
    lift, threshold = float(cap.defaults["concept_lift"]), float(cap.defaults["concept_threshold"])
    hits = 0
    for name, cs in zip(names, cmap.concepts(probs, CONCEPTS_SHOWN, CONCEPT_MIN_PROB)):
        sure = {c.word for c in cs if c.probability >= max(threshold, lift * cmap.share[c.word])}
        hits += sum(bool(sure & {*SYNONYMS.get(o, [o]), o}) for o in objects.get(name, []) if o != "person")
    return hits


@contextlib.contextmanager
def extra_mask(mask: Callable[[torch.Tensor, int], None]) -> Iterator[None]:
    """Scratch experiments only: both beam searches also apply ``mask(logp (N, V), step)`` in place after their
    own word bans (they look ``mask_logprobs`` up by name at each step)."""
    plain = search.mask_logprobs

    def masked(logp: torch.Tensor, prev: torch.Tensor, step: int, **kw: object) -> torch.Tensor:
        logp = plain(logp, prev, step, **kw)  # (N, V)
        mask(logp, step)
        return logp

    search.mask_logprobs = constrained.mask_logprobs = masked
    try:
        yield
    finally:
        search.mask_logprobs = constrained.mask_logprobs = plain


def prefixed_search(cap: Captioner, annotations: torch.Tensor, prefix: list[int]) -> search.Hypothesis:
    """The best beam-search caption of one image (1, L, D) that starts with ``prefix`` (word ids)."""

    def forced(logp: torch.Tensor, step: int) -> None:
        if step < len(prefix):
            keep = logp[:, prefix[step]].clone()  # (N,)
            logp.fill_(float("-inf"))
            logp[:, prefix[step]] = keep

    stoi, d = cap.vocab.stoi, cap.defaults
    with extra_mask(forced):
        return search.beam_search(
            cap.decoder,
            annotations,
            stoi["<start>"],
            stoi["<end>"],
            beam_size=int(d["beam_size"]),
            length_alpha=float(d["length_alpha"]),
            unk_id=stoi.get("<unk>"),
        )[0][0]


def subject(args: argparse.Namespace) -> list[dict]:
    refs = references()
    cap = Captioner.load(device="cpu")
    cmap, stoi, itos = cap.concept_map, cap.vocab.stoi, cap.vocab.itos
    assert cmap is not None
    lift, threshold = float(cap.defaults["concept_lift"]), float(cap.defaults["concept_threshold"])
    runs = {}  # part -> [(name, guided text, guided score, (p, subject text, subject score) | None)]
    for part in ("coco_mini", "flickr8k_dev"):
        data, rows = torch.load(Path(args.cache) / f"{part}.pt"), []
        for i in range(0, len(data["names"]), 50):
            concepts = cmap.concepts(data["probs"][i : i + 50], CONCEPTS_SHOWN, CONCEPT_MIN_PROB)
            for j, (c, cs) in enumerate(zip(cap.decode(data["feats"][i : i + 50], concepts=concepts), concepts)):
                sure = [
                    k
                    for k in cs
                    if k.word not in cmap.scenes and k.probability >= max(threshold, lift * cmap.share[k.word])
                ]
                alt = None
                if sure and cmap.forms[sure[0].word]:
                    h = prefixed_search(
                        cap, data["feats"][i + j : i + j + 1], [stoi["a"], stoi[cmap.forms[sure[0].word][0]]]
                    )
                    words = show_placed([itos[t] for t in h.ids], cmap.shown[sure[0].word])
                    alt = (sure[0].probability, " ".join(words), h.score)
                rows.append((data["names"][i + j], c.text, c.score, alt))
        runs[part] = rows
    out = []
    for tau, beta in [(None, None), *itertools.product((0.3, 0.5), (0.0, 0.1, 0.2, 0.3))]:
        texts, switched = {}, 0
        for part, rows in runs.items():
            texts[part] = {}
            for name, text, s, alt in rows:
                use = tau is not None and alt is not None and alt[0] >= tau and alt[2] + beta >= s
                texts[part][name] = alt[1] if use else text
                switched += use
        label = "shipped" if tau is None else f"tau {tau}, beta {beta}"
        row = {"label": label, "switched": switched, **figures(texts["coco_mini"], texts["flickr8k_dev"], refs)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


DOGS = frozenset({"dog", "dogs", "puppy", "puppies"})


def people(args: argparse.Namespace) -> list[dict]:
    """Oracle: the shipped defaults, with person words (and then dog words too) banned on the photos whose five
    references name none, as a perfect person (dog) detector would; both dev sets, captions from the cache."""
    refs = references()
    by_part = {"coco_mini": refs[0], "flickr8k_dev": refs[2]}
    cap = Captioner.load(device="cpu")
    stoi = cap.vocab.stoi
    banned: list[int] = []  # word ids banned for the image being decoded (one image at a time)

    def ban(logp: torch.Tensor, step: int) -> None:
        logp[:, banned] = float("-inf")  # (N, V)

    out = []
    for label, groups in (("shipped", ()), ("no person words", (PEOPLE,)), ("no person or dog words", (PEOPLE, DOGS))):
        texts: dict[str, dict[str, str]] = {}
        bans = 0
        for part, part_refs in by_part.items():
            data, texts[part] = torch.load(Path(args.cache) / f"{part}.pt"), {}
            for i, name in enumerate(data["names"]):
                words = {w for r in part_refs[name] for w in tokenize(r)}
                banned[:] = [stoi[w] for g in groups if not g & words for w in g if w in stoi]
                bans += bool(banned)
                probs = data["probs"][i : i + 1]  # (1, 1000)
                concepts = cap.concept_map.concepts(probs, CONCEPTS_SHOWN, CONCEPT_MIN_PROB)
                with extra_mask(ban):
                    texts[part][name] = cap.decode(data["feats"][i : i + 1], concepts=concepts)[0].text
        coco = texts["coco_mini"]
        row = {"label": label, "images_with_bans": bans, **figures(coco, texts["flickr8k_dev"], refs)}
        row["invented_people"] = list(invented_people(coco, refs[0]))
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=["regions", "subject", "people"])
    ap.add_argument("--cache", default="/tmp/concept-sweep", help="sweep_concepts.py's cache folder")
    ap.add_argument("--output", help="write the rows as JSON here")
    args = ap.parse_args()
    rows = {"regions": regions, "subject": subject, "people": people}[args.experiment](args)
    if args.output:
        Path(args.output).write_text(json.dumps({"experiment": args.experiment, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
