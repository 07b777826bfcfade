"""Two source trees' services, alternated: 8 clients then 1 client on the same Flickr8k test photos.

    git worktree add /tmp/old HEAD~1
    .venv/bin/python bench/bench_service_ab.py --data ../shared/data/flickr8k --trees /tmp/old . --rounds 4

Each round starts each tree's service in turn (the order flips every round), with this checkout's
``.venv`` and the tree on ``PYTHONPATH``; it waits for ``/readyz``, warms up with 8 requests, then
runs ``--clients`` clients over ``--n`` photos and 1 client over the first ``--single-n``. It prints
one JSON line per run (req/s, their ratio, the mean micro-batch, the 1-client p50) and, at the
end, each tree's medians. Use it for a change to the service or the model's speed, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_anchor import pick_photos
from bench.bench_service import HOST, Service, free_port, run_clients


def one_run(tree: Path, uploads: list[bytes], args: argparse.Namespace, log: Path) -> dict:
    port = free_port()
    env = dict(os.environ, HOST=HOST, PORT=str(port), CAPTIONER_LOG_LEVEL="warning")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    service = Service(env, log, tree=tree)
    query = f"beam_size={args.beam_size}"
    try:
        service.wait_ready(port, 300)
        run_clients(port, uploads[:8], 1, 8, query)  # warm-up
        many = run_clients(port, uploads, args.clients, max(1, len(uploads) // args.clients), query)
        one = run_clients(port, uploads[: args.single_n], 1, args.single_n, query)
    finally:
        service.stop()
    return {
        "tree": str(tree),
        f"c{args.clients}_rps": many["throughput_rps"],
        "c1_rps": one["throughput_rps"],
        "ratio": round(many["throughput_rps"] / one["throughput_rps"], 2),
        "mean_batch": many["mean_batch_size"],
        "c1_p50_ms": one.get("p50_ms"),
        "errors": many["errors"] + one["errors"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the Flickr8k folder")
    ap.add_argument("--trees", nargs=2, required=True, type=Path, help="two source trees (a git worktree and .)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--n", type=int, default=200, help="test photos for the many-client run")
    ap.add_argument("--single-n", type=int, default=50, help="of those, the first N for the 1-client run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--beam-size", type=int, default=3)
    args = ap.parse_args()
    data = Path(args.data)
    paths = pick_photos(data / "images", data / "Flickr_8k.testImages.txt", args.n)
    uploads = [p.read_bytes() for p in paths]
    trees = [t.resolve() for t in args.trees]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="service_ab_") as tmp:
        for k in range(args.rounds):
            for tree in trees if k % 2 == 0 else trees[::-1]:
                run = {"round": k, **one_run(tree, uploads, args, Path(tmp) / f"{k}-{tree.name}.log")}
                print(json.dumps(run), flush=True)
                runs.append(run)
    for tree in trees:
        mine = [r for r in runs if r["tree"] == str(tree)]
        medians = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k not in ("tree", "round", "errors")}
        print(json.dumps({"tree": str(tree), "medians": medians, "errors": sum(r["errors"] for r in mine)}))


if __name__ == "__main__":
    main()
