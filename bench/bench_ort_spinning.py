"""Single-image ``Captioner.caption`` latency with ONNX Runtime's intra-op spin-waiting on (its default) or off.

    .venv/bin/python bench/bench_ort_spinning.py 1   # spinning on
    .venv/bin/python bench/bench_ort_spinning.py 0   # spinning off

Run the two alternately, a few times each. Captions 30 Flickr8k test photos one at a time after 3 warm-up
captions, in this process, on the shipped model's ONNX path; prints the median and mean in ms.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import onnxruntime as ort

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


class _Options(ort.SessionOptions):
    """SessionOptions with ``session.intra_op.allow_spinning`` set from the command line."""

    def __init__(self) -> None:
        super().__init__()
        self.add_session_config_entry("session.intra_op.allow_spinning", sys.argv[1])


def main() -> None:
    ort.SessionOptions = _Options  # captioner.runtime builds its session options from this name
    from captioner.api import Captioner

    cap = Captioner.load(device="cpu", runtime="onnx")
    names = (DATA / "Flickr_8k.testImages.txt").read_text().split()[:30]
    paths = [DATA / "images" / n for n in names]
    for p in paths[:3]:
        cap.caption(p)
    times = []
    for p in paths:
        start = time.perf_counter()
        cap.caption(p)
        times.append((time.perf_counter() - start) * 1000)
    print(f"spinning {sys.argv[1]}: median {statistics.median(times):.1f} ms, mean {statistics.mean(times):.1f} ms")


if __name__ == "__main__":
    main()
