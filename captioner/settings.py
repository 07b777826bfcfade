"""The library's settings: ``CAPTIONER_*`` environment variables, default paths and the decoding limits.

Standard library only, so the command-line parsers (``captioner --help``) and the service's
configuration read these without importing torch. The service's own variables are the
``ENV_VARS`` table in ``service/config.py``; the ones read here are:

- ``CAPTIONER_MODEL``: the checkpoint folder used when none is given (:func:`default_model_path`);
- ``CAPTIONER_CACHE``: the feature cache folder (:func:`default_cache_dir`);
- ``CAPTIONER_FAST``: the CPU speed-ups of ``Captioner.load`` (an on/off word, :func:`parse_flag`).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The shipped model, a folder of ``models/`` (see :func:`default_model_path`).
DEFAULT_MODEL_NAME = "flickr8k-lite2"
#: Upper bounds enforced for every caller (service, CLI, API).
MAX_BEAM_SIZE = 10
MAX_LENGTH_LIMIT = 60
#: ``guidance`` values: ``concepts`` places one of the ``concept_top`` most likely visual objects and, with
#: ``concept_scene``, the place word (kitchen, table) in the caption, with ``concept_places`` only as "in a kitchen",
#: "at the table" (constrained beam search; a concept counts when its
#: probability p reaches ``concept_threshold`` and ``concept_lift`` times its words' class share, and each is
#: kept when it costs at most ``concept_weight`` x p, at a step where the model finds its word plausible,
#: ``concept_margin``; defaults chosen on dev data); ``none`` is the plain model.
GUIDANCE = ("concepts", "none")
#: What runs the encoder on the CPU fast path (``Captioner.load(runtime=...)``, ``CAPTIONER_RUNTIME``):
#: ``auto`` (ONNX Runtime when installed and the model has a matching exported encoder), ``torch`` or ``onnx``.
RUNTIMES = ("auto", "torch", "onnx")
#: Precisions of the exported ONNX encoder (``captioner export --onnx --precision``) and the calibration
#: methods of the int8 one (``captioner.onnx_export``). ONNX Runtime's Entropy method, at its default 128
#: bins, wrote the MinMax file byte for byte, so it is not offered.
ONNX_PRECISIONS = ("fp32", "int8")
CALIBRATION_METHODS = ("minmax", "percentile")
#: Encoder choices of ``captioner train`` (``captioner.encoder`` builds them): backbones and the layer attended over.
BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "resnet50", "resnet101")
STAGES = ("head", "stride16")

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


def parse_flag(text: str, name: str) -> bool:
    """An on/off setting such as ``$CAPTIONER_FAST``: 1/true/yes/on or 0/false/no/off/empty (any case)."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be a boolean (1/0, true/false), got {text!r}")


def default_model_path() -> Path:
    """``$CAPTIONER_MODEL``, else the shipped model: ``captioner/models/`` in an installed wheel (package
    data, see pyproject.toml), the repository's ``models/`` folder in a source checkout."""
    env = os.environ.get("CAPTIONER_MODEL")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    packaged = package / "models" / DEFAULT_MODEL_NAME
    return packaged if packaged.is_dir() else package.parent / "models" / DEFAULT_MODEL_NAME


#: Images per encoder pass and batched beam search in batch captioning (``captioner caption --batch-size``). On 2 CPU
#: cores 32 ran 2-9% faster than 16 in each of 5 alternated pairs over 500 Flickr8k test photos, and 64 no faster
#: (BENCHMARKS.md, issue 19, session 10); captions do not depend on it (batch invariance).
CAPTION_BATCH = 32
#: Encoder runtimes that batch captioning runs one batch ahead, on one thread, while the decoder works on the other
#: core (``captioner.batch.encoded_ahead``). With the int8 encoder the two take about as long, and 320 Flickr8k test
#: photos went 12-16% faster; the fp32 encoder on one thread outlasts the decoder, and the overlap was 8% slower
#: (BENCHMARKS.md, issue 19, session 11).
OVERLAP_RUNTIMES = ("onnxruntime-int8",)


def requested_runtime(runtime: str | None = None) -> str:
    """``runtime``, else ``$CAPTIONER_RUNTIME``, else ``auto`` (one of :data:`RUNTIMES`; ValueError otherwise)."""
    value = (runtime if runtime is not None else os.environ.get("CAPTIONER_RUNTIME", "auto")).strip().lower() or "auto"
    if value not in RUNTIMES:
        raise ValueError(f"the runtime (CAPTIONER_RUNTIME) must be one of {', '.join(RUNTIMES)}, got {value!r}")
    return value


def default_workers() -> int:
    """Image-decoding processes of batch captioning: one core is left for the model (0: decode in this process)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def default_cache_dir() -> Path:
    """The feature cache folder: ``$CAPTIONER_CACHE``, else ``.cache/captioner`` under the current folder."""
    return Path(os.environ.get("CAPTIONER_CACHE", ".cache/captioner"))
