"""Visual concepts: caption words for what the encoder's ImageNet classifier sees.

EfficientNet-Lite ships a 1000-class ImageNet classifier. A captioning checkpoint fine-tunes the
last blocks of the encoder, so the classifier belongs with the *original* last blocks:
:class:`ImageNetHead` holds packaged copies of those blocks, the conv head and the classifier, and
:class:`ConceptEncoder` runs it on the trunk map the caption encoder computes anyway, so the extra
cost is a few blocks on a 9x9 map.

:class:`ConceptMap` turns class probabilities into word probabilities with the reviewed mapping in
``resources/imagenet_concepts.json`` (written by ``scripts/make_concept_map.py``): a word's
probability is the summed probability of the classes that name it (every dog breed says "dog").
A *novel* word outside the vocabulary (zebra, sink) is placed through its in-vocabulary proxy
(horse, tub): the decoder scores and reads the proxy, :meth:`ConceptMap.shown` names what the
caption shows instead, and :func:`show_placed` writes it with the article and number fixed.
:meth:`ConceptMap.constraints` turns each image's confident concepts into the word constraints of
:func:`captioner.constrained.constrained_beam_search`, and :meth:`ConceptMap.places` its rule that a place word
(kitchen, table) comes only in a place phrase ("at the table").
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .constrained import Places
from .encoder import Encoder, build_lite

MAPPING_FILE = "imagenet_concepts.json"
# a place word (a scene: kitchen, table) is placed only after one of the articles that follows a preposition
PLACE_PREPOSITIONS = (
    "in", "on", "at", "inside", "near", "by", "beside", "behind", "under", "outside", "into", "onto", "across",
    "around", "through", "from", "over", "beneath", "underneath",
)  # fmt: skip
PLACE_ARTICLES = ("a", "an", "the")


@dataclass(frozen=True)
class Concept:
    """A caption word the classifier sees in the image, with its probability."""

    word: str
    probability: float

    def to_dict(self) -> dict[str, float | str]:
        return {"word": self.word, "probability": round(self.probability, 4)}


class ImageNetHead(nn.Module):
    """The packaged network's last ``n_top`` blocks, conv head and classifier: trunk map -> logits.

    Attribute names follow EfficientNet's (``_blocks``, ``_conv_head``, ``_bn1``) so that
    :func:`captioner.perf.fold_batchnorm` folds its batch norms like the encoder's.
    """

    def __init__(self, net: nn.Module, n_top: int) -> None:
        super().__init__()
        blocks = list(net._blocks)
        self._blocks = nn.ModuleList(copy.deepcopy(blocks[len(blocks) - n_top :]))
        self._conv_head, self._bn1 = copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1)
        self._swish, self._fc = copy.deepcopy(net._swish), copy.deepcopy(net._fc)

    @classmethod
    def packaged(cls, encoder: Encoder, n_top: int) -> ImageNetHead:
        """The head for ``encoder``'s backbone with the packaged ImageNet weights (EfficientNet-Lite only)."""
        encoder.check_cut(n_top)
        net = build_lite(encoder.config, pretrained=True, keep_classifier=True)
        return cls(net, n_top).eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """trunk map (B, C, h, w) -> ImageNet logits (B, 1000)."""
        for block in self._blocks:
            x = block(x)  # (B, C', h', w')
        x = self._swish(self._bn1(self._conv_head(x)))  # (B, 1280, h', w')
        return self._fc(x.mean(dim=(2, 3)))  # (B, 1000)


class ConceptEncoder(nn.Module):
    """Caption encoder + ImageNet head sharing one trunk: images -> (annotations, class probabilities)."""

    def __init__(self, encoder: Encoder, head: ImageNetHead, n_top: int) -> None:
        super().__init__()
        self.encoder, self.head, self.n_top = encoder, head, n_top
        self.config = encoder.config

    @property
    def net(self) -> nn.Module:  # captioner.perf folds the encoder's batch norms through this attribute
        return self.encoder.net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) -> annotations (B, L, D), class probabilities (B, 1000)."""
        x = self.encoder.trunk(images, self.n_top)  # (B, C, h, w)
        return self.encoder.top(x, self.n_top), torch.softmax(self.head(x).float(), dim=-1)


class ConceptMap:
    """ImageNet class -> caption words, restricted to one vocabulary (novel words through their proxies)."""

    def __init__(
        self,
        class_words: list[list[str]],
        vocab_words: list[str],
        proxies: dict[str, str] | None = None,
        scenes: set[str] | None = None,
    ) -> None:
        known = set(vocab_words)
        # a proxy only stands in for a word the vocabulary lacks
        self.proxies = {w: p for w, p in (proxies or {}).items() if w not in known and p in known}
        self.words = sorted({w for ws in class_words for w in ws if w in known or w in self.proxies})
        self.scenes = {w for w in scenes or set() if w in self.words}  # place words (kitchen, table), not objects
        index = {w: i for i, w in enumerate(self.words)}
        matrix = torch.zeros(len(class_words), len(self.words))  # (1000, W)
        for c, ws in enumerate(class_words):
            for w in ws:
                if w in index:
                    matrix[c, index[w]] = 1.0
        self.matrix = matrix
        # share of the classes that name each word: what its probability is under a flat classifier
        self.share = dict(zip(self.words, (matrix.sum(0) / len(class_words)).tolist()))
        self.forms: dict[str, list[str]] = {}  # concept word -> the vocabulary words that place it
        self.shown: dict[str, dict[str, str]] = {}  # concept word -> {vocabulary form: what the caption shows}
        for w in self.words:
            stem = self.proxies.get(w, w)
            self.forms[w] = [f for f in (stem, stem + "s", stem + "es") if f in known]
            self.shown[w] = {f: f if stem == w else (w if f == stem else plural(w)) for f in self.forms[w]}

    @classmethod
    def load(cls, vocab_words: list[str], path: str | Path | None = None) -> ConceptMap:
        """The packaged mapping (or ``path``), keeping the words of ``vocab_words``."""
        text = (
            Path(path).read_text()
            if path
            else resources.files("captioner.resources").joinpath(MAPPING_FILE).read_text(encoding="utf-8")
        )
        data = json.loads(text)
        classes = sorted(data["classes"], key=lambda c: c["index"])
        words = [c["words"] + c.get("novel", []) + ([c["scene"]] if "scene" in c else []) for c in classes]
        return cls(words, vocab_words, data.get("proxies", {}), {c["scene"] for c in classes if "scene" in c})

    def word_probs(self, class_probs: torch.Tensor) -> torch.Tensor:
        """class probabilities (B, 1000) -> word probabilities (B, W), each at most 1."""
        return (class_probs.float().cpu() @ self.matrix).clamp_max(1.0)  # (B, W)

    def concepts(self, class_probs: torch.Tensor, top: int = 5, min_prob: float = 0.1) -> list[list[Concept]]:
        """For each image, its ``top`` most likely words with probability >= ``min_prob``, best first."""
        probs = self.word_probs(class_probs)  # (B, W)
        values, index = probs.topk(min(top, probs.shape[1]), dim=1)  # (B, top)
        return [
            [Concept(self.words[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist()) if p >= min_prob]
            for vs, ix in zip(values, index)
        ]

    def constraints(
        self, concepts: list[list[Concept]], stoi: dict[str, int], vocab_size: int, settings: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[dict[str, str]]]:
        """Each image's search constraints from its confident concepts, under ``settings`` (a captioner's inference
        defaults): probability p reaching ``concept_threshold`` and ``concept_lift`` x the word's class share (a
        "dog" named by 121 of the 1000 classes needs more than a "zebra").

        The top ``concept_top`` object words form one constraint that either satisfies, except that a second
        object with p >= ``concept_pair`` is a constraint of its own; with ``concept_scene`` the top place word
        (kitchen, bathroom, table: :attr:`ConceptMap.scenes`) is one more. Returns the (B, C, V) bool mask of each
        constraint's vocabulary forms (a novel word's are its proxy's), the (B, C) score allowance
        ``concept_weight`` x (its summed p) that satisfying each may cost (None: any cost), and per image
        {vocabulary form: the word the caption shows}.
        """
        threshold, top = float(settings["concept_threshold"]), int(settings["concept_top"])
        lift = float(settings["concept_lift"] or 0.0)
        pair = float(settings["concept_pair"])
        C = top + int(bool(settings["concept_scene"]))
        required = torch.zeros(len(concepts), C, vocab_size, dtype=torch.bool)
        mass = torch.zeros(len(concepts), C)  # (B, C)
        shown: list[dict[str, str]] = [{} for _ in concepts]
        scene = bool(settings["concept_scene"])
        for b, cs in enumerate(concepts):
            sure = [c for c in cs if c.probability >= max(threshold, lift * self.share[c.word])]
            objects = [c for c in sure if c.word not in self.scenes][:top]
            places = [c for c in sure if c.word in self.scenes][: int(scene)]
            for c in objects + places:
                if any(f in shown[b] for f in self.forms[c.word]):
                    continue  # two concepts placed through one proxy: the likelier one names it
                # its own constraint (the next free one) for a place or a confident second object, else the first's
                own = c in places or (c is not objects[0] and c.probability >= pair)
                k = int((mass[b] > 0).sum()) if own else 0
                mass[b, k] += c.probability
                shown[b] |= self.shown[c.word]
                for form in self.forms[c.word]:
                    required[b, k, stoi[form]] = True
        C = int(required.any(2).any(0).sum())  # constraints fill from the first: drop the ones no image uses
        weight = settings["concept_weight"]
        return required[:, :C], None if weight is None else float(weight) * mass[:, :C], shown

    def places(self, required: torch.Tensor, stoi: dict[str, int]) -> Places:
        """required (B, C, V) from :meth:`constraints` -> the :class:`Places` rule for its scene words' forms."""
        V = required.shape[-1]

        def vocabulary_mask(words: list[str] | tuple[str, ...]) -> torch.Tensor:
            mask = torch.zeros(V, dtype=torch.bool)  # (V,)
            mask[[stoi[w] for w in words if w in stoi]] = True
            return mask

        scene_forms = vocabulary_mask([f for w in self.scenes for f in self.forms[w]])  # (V,)
        return Places(
            required.any(1) & scene_forms, vocabulary_mask(PLACE_PREPOSITIONS), vocabulary_mask(PLACE_ARTICLES)
        )


def plural(word: str) -> str:
    """English plural of a noun or a noun phrase's last word ("bus" -> "buses", "parking meter" -> "parking meters")."""
    if word.endswith(("s", "sh", "ch", "x", "z")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def indefinite_article(word: str) -> str:
    """ "a" or "an" by the word's first sound (a vowel letter, except "uni-", "use", "eu-", "one-"; a silent "h")."""
    w = word.lower()
    if w.startswith(("uni", "use", "usu", "uti", "eu", "one", "ur")):
        return "a"
    return "an" if w[:1] in set("aeiou") or w.startswith(("hour", "honest", "heir")) else "a"


def show_placed(words: list[str], shown: dict[str, str]) -> list[str]:
    """A caption's words with each placed concept form (a key of ``shown``) written as shown there,
    and an "a"/"an" right before it fixed to the shown word's sound."""
    out = list(words)
    for i, w in enumerate(words):
        if w in shown:
            out[i] = shown[w]
            if i > 0 and out[i - 1] in ("a", "an"):
                out[i - 1] = indefinite_article(out[i])
    return out
