"""``captioner`` entry point: the command registry, the top-level parser and error handling."""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import logging
import sys

from ..datasets import DatasetError

#: The subcommands, in ``--help`` order; each is ``captioner.commands.<name>``.
COMMANDS = ("train", "evaluate", "export", "caption", "score", "data")


def build_parser() -> argparse.ArgumentParser:
    """The ``captioner`` parser with every registered command's sub-parser."""
    parser = argparse.ArgumentParser(prog="captioner", description="Show, Attend and Tell image captioning")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return parser


#: Packages of an optional extra (pyproject.toml) -> that extra; inference needs none of them.
EXTRA_OF = {"nltk": "train", "pycocoevalcap": "train", "matplotlib": "train"}


#: Errors that are bad input, not bugs (a message and exit status 2), by module; looked up in sys.modules
#: when something was raised, so that a command which never loaded a model does not import torch for them.
INPUT_ERRORS = {"captioner.checkpoint": "CheckpointError", "captioner.images": "ImageError"}


def input_errors() -> tuple[type[Exception], ...]:
    """DatasetError, FileNotFoundError and the :data:`INPUT_ERRORS` whose modules are loaded (only those can
    have been raised)."""
    loaded = tuple(getattr(sys.modules[m], name) for m, name in INPUT_ERRORS.items() if m in sys.modules)
    return (DatasetError, FileNotFoundError, *loaded)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "caption":
        # the process's last exit step: the interpreter's final garbage collection walks torch's many
        # objects for nothing (the memory goes back to the system anyway); frozen, exit is ~0.5 s shorter.
        # Only here: training must free its process group's threads before the interpreter goes.
        atexit.unregister(gc.freeze)
        atexit.register(gc.freeze)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except input_errors() as exc:
        print(f"captioner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a command of an extra the install lacks (pyproject.toml)
        extra = EXTRA_OF.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"captioner {args.command}: error: {exc.name} is not installed; it comes with the [{extra}] extra: "
            f"pip install 'captioner[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
