"""``captioner caption``: caption image files, folders, globs or a list on stdin (see docs/cli.md).

``--resume`` skips images that already have a record in ``--output`` (a torn last line from a
kill is cut off first). Under ``torchrun`` each rank captions every WORLD_SIZE-th image into a
part file and rank 0 merges the parts in input order. The work itself is :mod:`captioner.batch`
(images -> captions) and :mod:`captioner.outputs` (records, resume, attention files).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import outputs
from ..outputs import FORMATS, PROG
from ..settings import CAPTION_BATCH, GUIDANCE, MAX_BEAM_SIZE, MAX_LENGTH_LIMIT, default_workers
from .common import int_range

if TYPE_CHECKING:
    from ..api import Captioner
    from ..distributed import Distributed


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``captioner caption``."""
    c = sub.add_parser(
        "caption",
        help="caption image files, folders, globs or a list on stdin",
        description="Caption many images in batches; one record per image (see docs/cli.md).",
    )
    c.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders, glob patterns ('photos/**/*.jpg'), or - to read paths from stdin",
    )
    c.add_argument("-r", "--recursive", action="store_true", help="also take images from sub-folders")
    c.add_argument(
        "--checkpoint", metavar="DIR", help="checkpoint folder (default: $CAPTIONER_MODEL or the shipped model)"
    )
    c.add_argument("-o", "--output", metavar="FILE", help="output file (default: stdout)")
    c.add_argument("--format", choices=FORMATS, help="record format (default: from the output's extension, else jsonl)")
    c.add_argument("--resume", action="store_true", help="skip images already in --output and append the rest")
    c.add_argument(
        "--attention-dir", metavar="DIR", help="write per-word attention overlays (PNG) and grids (.npz) here"
    )
    c.add_argument(
        "--beam-size",
        metavar="K",
        type=int_range(1, MAX_BEAM_SIZE),
        help=f"beam width, 1..{MAX_BEAM_SIZE} (default: the checkpoint's)",
    )
    c.add_argument(
        "--max-length",
        metavar="N",
        type=int_range(1, MAX_LENGTH_LIMIT),
        help=f"maximum caption words, 1..{MAX_LENGTH_LIMIT} (default: the checkpoint's)",
    )
    c.add_argument(
        "--n-best",
        metavar="N",
        type=int_range(1, MAX_BEAM_SIZE),
        default=1,
        help="also record the next N-1 best captions as 'alternatives' (default: 1)",
    )
    c.add_argument(
        "--length-alpha", metavar="A", type=float, help="length penalty exponent (default: the checkpoint's)"
    )
    c.add_argument(
        "--guidance",
        choices=GUIDANCE,
        help="concepts: the caption names one of the two most likely objects and the place (kitchen, bathroom, "
        "table) the classifier sees, each once, unless that costs the model too much; none: the plain model "
        "(default: the checkpoint's, concepts)",
    )
    c.add_argument(
        "--batch-size",
        metavar="B",
        type=int_range(1),
        default=CAPTION_BATCH,
        help=f"images per encoder pass and beam search (default: {CAPTION_BATCH})",
    )
    c.add_argument(
        "--workers",
        metavar="W",
        type=int_range(0),
        default=default_workers(),
        help=f"image-decoding processes, 0 = none (default here: {default_workers()})",
    )
    c.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    c.add_argument(
        "--exact",
        action="store_true",
        help="run the fp32 model exactly as trained, without the CPU speed-ups (int8 decoder, ...)",
    )
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary (errors are still shown)")
    c.set_defaults(func=run, _parser=c)


def _usage(args: argparse.Namespace, message: str) -> None:
    args._parser.error(message)  # exits with status 2


def _check_device(args: argparse.Namespace) -> None:
    import torch

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        _usage(args, f"--device {args.device}: CUDA is not available on this machine")
    if args.device and not args.device.startswith("cuda") and args.device != "cpu":
        _usage(args, f"--device must be cpu, cuda or cuda:N, not {args.device!r}")


class _Terminate(KeyboardInterrupt):
    """SIGTERM, turned into an exception so open files are closed properly (JSON gets its ']')."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminate()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``captioner caption``; returns the exit status (0 ok, 1 some input failed)."""
    fmt = outputs.output_format(args.output, args.format)
    if args.resume and not args.output:
        _usage(args, "--resume needs --output")
    if args.output and os.path.isdir(args.output):
        _usage(args, f"--output {args.output} is a folder")
    if args.inputs.count("-") > 1:
        _usage(args, "'-' (read paths from stdin) may be given only once")
    from datetime import timedelta

    _prefetch_encoder(args)
    from ..distributed import Distributed  # torch: after the usage checks, which answer at once

    # the ranks meet twice, around a whole run of captioning: gloo (CPU objects), a long timeout
    ddp = Distributed(backend="gloo", timeout=timedelta(hours=24))
    if ddp.world > 1 and not args.output:
        _usage(args, "under torchrun, --output is required (the ranks' parts are merged into it)")
    old = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        return _run(args, fmt, ddp)
    except BrokenPipeError:  # stdout closed early, e.g. piped into head
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        ddp.close()


def _prefetch_encoder(args: argparse.Namespace) -> None:
    """Build the ONNX Runtime encoder session on the other core while torch imports (captioner.ort_session).

    Only where the CPU fast path will run: not with ``--exact``, and not where a GPU may be picked (``--device``
    cuda, or a default device on a machine with NVIDIA or AMD GPU device files, which torch would use).
    """
    if args.exact or args.device not in (None, "cpu"):
        return
    if args.device is None and any(os.path.exists(f) for f in ("/dev/nvidiactl", "/dev/kfd")):
        return
    from ..ort_session import prefetch
    from ..settings import default_model_path

    prefetch(args.checkpoint or default_model_path())


def _load(args: argparse.Namespace, ddp: Distributed) -> Captioner:
    from ..api import Captioner
    from ..checkpoint import CheckpointError

    _check_device(args)
    try:
        return Captioner.load(args.checkpoint, device=ddp.device(args.device), fast=False if args.exact else None)
    except CheckpointError as exc:
        if args.checkpoint:
            raise
        raise CheckpointError(f"{exc}; pass --checkpoint FOLDER or set CAPTIONER_MODEL") from exc


def _plan(args: argparse.Namespace, fmt: str, ddp: Distributed) -> tuple[dict[str, Any], outputs.RecordWriter | None]:
    """Rank 0 alone reads the inputs (and stdin) and the existing output; every rank gets its plan."""
    from ..batch import expand

    writer = None
    plan: dict[str, Any] = {}
    if ddp.is_main:
        try:
            paths = expand(args.inputs, args.recursive)
            if args.output and os.path.realpath(args.output) in {os.path.realpath(p) for p in paths}:
                raise ValueError(f"--output {args.output} is also an input")
            scan = outputs.scan_output(args.output, fmt) if args.resume else None
            if args.output and not args.resume:
                for part in outputs.stale_parts(args.output):
                    os.remove(part)
            writer = outputs.RecordWriter(args.output, fmt, scan)
            if args.resume and scan is not None:
                outputs.recover_parts(args.output, writer, scan, {outputs.path_key(p): i for i, p in enumerate(paths)})
            if ddp.world > 1:  # rank 0 reopens the output to merge the parts at the end
                writer.close()
            status = scan.status if scan else {}
            todo = [p for p in paths if outputs.path_key(p) not in status]
            plan = {
                "todo": todo,
                "skipped": len(paths) - len(todo),
                "failed_before": sum(status.get(outputs.path_key(p), False) for p in paths),
            }
        except (ValueError, OSError) as exc:
            plan = {"error": str(exc)}
    return ddp.broadcast(plan), writer


def _run(args: argparse.Namespace, fmt: str, ddp: Distributed) -> int:
    cap = _load(args, ddp)
    plan, writer = _plan(args, fmt, ddp)
    if "error" in plan:
        if writer:
            writer.close()
        print(f"{PROG}: error: {plan['error']}", file=sys.stderr)
        return 2
    mine = plan["todo"][ddp.rank :: ddp.world]
    sink = (
        writer if ddp.world == 1 else outputs.RecordWriter(outputs.part_path(args.output, ddp.rank, ddp.world), "jsonl")
    )
    assert sink is not None
    start = time.perf_counter()
    done, failed = _caption_all(args, cap, mine, sink, ddp)
    elapsed = time.perf_counter() - start
    done, failed = ddp.sum([done, failed])  # every part is complete after this
    if ddp.world > 1 and ddp.is_main:
        merged = outputs.RecordWriter(args.output, fmt, outputs.scan_output(args.output, fmt))
        try:
            outputs.merge_parts(args.output, ddp.world, merged)
        finally:
            merged.close()
    if ddp.is_main and not args.quiet:
        rate = (done + failed) / elapsed if elapsed > 0 else 0.0
        before = f" ({plan['failed_before']} in an earlier run)" if plan["failed_before"] else ""
        print(
            f"{PROG}: {done} captioned, {plan['skipped']} skipped, {failed + plan['failed_before']} failed{before}"
            f" in {elapsed:.1f} s ({rate:.2f} images/s, encoder: {cap.runtime})"
            + (f" -> {args.output}" if args.output else ""),
            file=sys.stderr,
        )
    return 1 if failed or plan["failed_before"] else 0


def _caption_all(
    args: argparse.Namespace, cap: Captioner, paths: list[str], sink: outputs.RecordWriter, ddp: Distributed
) -> tuple[int, int]:
    """Caption ``paths`` into ``sink`` (and attention files), with a progress bar; returns (done, failed)."""
    from tqdm import tqdm

    from ..batch import Result, iter_captions

    att_dir = Path(args.attention_dir) if args.attention_dir else None
    if att_dir:
        att_dir.mkdir(parents=True, exist_ok=True)
    protected = {os.path.realpath(p) for p in paths} if att_dir else set()
    done = failed = 0
    bar = tqdm(
        total=len(paths),
        unit="img",
        file=sys.stderr,
        disable=args.quiet or not ddp.is_main or not paths,
        mininterval=1.0,
        dynamic_ncols=True,
        desc=f"rank 0/{ddp.world}" if ddp.world > 1 else "captioning",
    )
    try:
        for captioned in iter_captions(
            cap,
            paths,
            args.batch_size,
            args.workers,
            args.beam_size,
            args.max_length,
            args.n_best,
            args.length_alpha,
            thumbs=att_dir is not None,
            guidance=args.guidance,
        ):
            res, att = captioned, None  # res becomes a write error when its attention files cannot be written
            if res.error is None and att_dir is not None:
                try:
                    att = outputs.write_attention(att_dir, res, protected)
                except OSError as exc:
                    res = Result(res.path, error=f"cannot write attention files: {exc}", code="write_error")
            if res.error is not None:
                failed += 1
                tqdm.write(f"{PROG}: {res.path}: {res.error}", file=sys.stderr)
            else:
                done += 1
            sink.write(outputs.make_record(res, att))
            bar.update(1)
            bar.set_postfix(failed=failed, refresh=False)
    finally:
        bar.close()
        sink.close()
    return done, failed
