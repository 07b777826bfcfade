"""When a ``captioner caption`` run produces its captions: first line, last line, exit, and the rates between.

    .venv/bin/python bench/bench_cli_timeline.py --list photos.txt --rounds 3 [--tree /tmp/old] [-- EXTRA CLI ARGS]

One fresh process per round reads the list on stdin (``captioner caption - -q``) and prints JSONL; this
script timestamps each line as it arrives. ``--tree DIR`` alternates each round with the same command run
from another checkout of the code (``git worktree add DIR REV``), for A/B runs on this machine's noisy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the CLI's main, imported from TREE when set (ahead of the editable install), else from this checkout
LAUNCH = (
    "import os, sys; tree = os.environ.get('BENCH_TREE'); "
    "sys.path.insert(0, tree) if tree else None; "
    "from captioner.commands.main import main; sys.exit(main())"
)


def one_run(listing: Path, tree: str | None, extra: list[str]) -> dict:
    env = dict(os.environ, CAPTIONER_MODEL=os.environ.get("CAPTIONER_MODEL", str(REPO / "models" / "flickr8k-lite2")))
    if tree:
        env["BENCH_TREE"] = tree
    t0 = time.perf_counter()
    with listing.open() as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "caption", "-", "-q", *extra],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdout is not None
        stamps = [time.perf_counter() - t0 for _ in proc.stdout]
    code = proc.wait()
    end = time.perf_counter() - t0
    if code != 0 or not stamps:
        raise SystemExit(f"captioner caption exited with {code} after {len(stamps)} captions")
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {
        "tree": tree or str(REPO),
        "captions": len(stamps),
        "first_s": round(stamps[0], 2),
        "last_s": round(stamps[-1], 2),
        "exit_s": round(end, 2),
        "wall_img_s": round(len(stamps) / end, 2),
        "steady_img_s": None if steady is None else round(steady, 2),
        "load1": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", required=True, type=Path, help="a file of image paths, one per line")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", help="another checkout to alternate with")
    ap.add_argument("extra", nargs="*", help="more captioner caption arguments (after --)")
    args = ap.parse_args()
    runs = []
    for _ in range(args.rounds):
        for tree in ([args.tree] if args.tree else []) + [None]:
            runs.append(one_run(args.list, tree, args.extra))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "cli_timeline", "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
