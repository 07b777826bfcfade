"""Training defaults that fit the data and honest logs: warm-up in epochs, decoding tuned on dev, lr and SCST counts."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.commands.main import build_parser, main
from captioner.schedule import warmup_steps
from captioner.tuning import tune_decoding

from test_train import CAPTIONS, log_lines, train_args


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_caption_dataset

    return write_caption_dataset(tmp_path_factory.mktemp("data"), CAPTIONS, dev={i for i in CAPTIONS if i >= 4})


def _without(argv: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def test_warmup_scales_with_the_epoch() -> None:
    assert warmup_steps(None, 0.5, steps_per_epoch=40, total_steps=120) == 20
    assert warmup_steps(None, 0.5, steps_per_epoch=400, total_steps=1200) == 200
    assert warmup_steps(None, 2, steps_per_epoch=40, total_steps=120) == 80
    # given in steps: capped at a tenth of the run, as before
    assert warmup_steps(500, 2, steps_per_epoch=40, total_steps=120) == 12


def test_tuning_picks_the_best_setting_and_the_smaller_beam_on_ties() -> None:
    scores = {
        (1, 0.0): 50.0,
        (3, 0.0): 55.0,
        (3, 0.5): 61.0,
        (3, 1.0): 61.0,
        (5, 0.0): 58.0,
        (5, 0.5): 61.0,
        (5, 1.0): 60.0,
    }
    tried = []

    def score(beam: int, alpha: float) -> dict:
        tried.append((beam, alpha))
        return {"cider": scores[beam, alpha], "bleu4": 1.0}

    best, table = tune_decoding(score)
    assert best == {"beam_size": 3, "length_alpha": 0.5}
    assert tried == list(scores) and len(table) == 7


def test_training_stores_decoding_tuned_on_dev(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(train_args(dataset, out, 2)) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    config = json.loads((out / "best" / "config.json").read_text())
    tuned = config["training"]["decoding_tuned"]
    assert tuned["split"] == "dev" and tuned["images"] == 2 and len(tuned["grid"]) == 7
    best_row = max(tuned["grid"], key=lambda r: r["cider"])
    assert config["inference"]["beam_size"] == best_row["beam_size"]
    assert config["inference"]["length_alpha"] == best_row["length_alpha"]
    assert summary["decoding"]["beam_size"] == best_row["beam_size"]
    # given on the command line, a setting is kept and only the other one is tuned
    fixed = tmp_path / "fixed"
    assert main(train_args(dataset, fixed, 1, "--beam-size", "2")) == 0
    config = json.loads((fixed / "best" / "config.json").read_text())
    assert config["inference"]["beam_size"] == 2
    assert {r["beam_size"] for r in config["training"]["decoding_tuned"]["grid"]} == {2}
    # and --no-tune-decoding stores the plain defaults
    plain = tmp_path / "plain"
    assert main(train_args(dataset, plain, 1, "--no-tune-decoding")) == 0
    config = json.loads((plain / "best" / "config.json").read_text())
    assert config["inference"]["beam_size"] == 3 and config["inference"]["length_alpha"] == 0.0
    assert "decoding_tuned" not in config["training"]


def test_log_file_has_real_lr_and_no_progress_bars(dataset: Path, tmp_path: Path) -> None:
    """A background run (stdout/stderr not terminals): one line per epoch with the lr of metrics.jsonl, no bars."""
    out = tmp_path / "run"
    argv = _without(train_args(dataset, out, 3, "--lr", "2e-4"), "--lr")
    argv.remove("--quiet")
    with (tmp_path / "log").open("w") as log:
        subprocess.run(
            [sys.executable, "-m", "captioner.commands.main", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=600,
        )
    text = (tmp_path / "log").read_text()
    assert "\r" not in text and "batch/s" not in text and "it/s" not in text
    printed = [json.loads(line) for line in text.splitlines() if line.startswith('{"epoch"')]
    logged = log_lines(out)
    assert [r["epoch"] for r in printed] == [1, 2, 3]
    for p, m in zip(printed, logged):
        assert p["lr"] > 0 and p["lr"] == pytest.approx(m["lr"], rel=1e-2)


def test_scst_summary_counts_scst_epochs(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    xe = tmp_path / "xe"
    assert main(train_args(dataset, xe, 1, "--no-tune-decoding")) == 0
    capsys.readouterr()
    out = tmp_path / "scst"
    assert (
        main(
            train_args(
                dataset,
                out,
                1,
                "--init-from",
                str(xe / "best"),
                "--scst-epochs",
                "2",
                "--scst-samples",
                "2",
                "--scst-max-length",
                "6",
                "--no-tune-decoding",
            )
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["epochs"] == 2 and [r["epoch"] for r in log_lines(out)] == [0, 1, 2]


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))
    if path:
        yield path, parser


def test_every_option_has_help_and_its_default_once() -> None:
    for path, parser in _subcommands(build_parser()):
        if path == ("data", "download"):  # its parser belongs to the download code (issue 15's)
            continue
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS and "-h" not in action.option_strings:
                assert action.help, f"captioner {' '.join(path)} {action.option_strings[0]} has no help"
        text = parser.format_help()
        assert text.count("(default: flickr8k)") <= 1, path
        for block in text.split("\n  -")[1:]:
            assert " ".join(block.split()).count("(default") <= 1, f"{' '.join(path)}: {block.split()[0]}"
    train = next(p for path, p in _subcommands(build_parser()) if path == ("train",))
    helps = {a.option_strings[0]: train._get_formatter()._expand_help(a) for a in train._actions if a.option_strings}
    for option, default in (
        ("--epochs", "20"),
        ("--encoder", "efficientnet-lite2"),
        ("--image-size", "260"),
        ("--lr", "0.001"),
        ("--warmup-epochs", "0.5"),
        ("--dataset", "flickr8k"),
    ):
        assert helps[option].count(f"(default: {default})") == 1, option
