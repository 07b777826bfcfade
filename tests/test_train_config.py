"""TrainConfig is ``captioner train``'s options: the same names, the same defaults, one mapping."""

from __future__ import annotations

import dataclasses

import pytest

from captioner.commands.main import build_parser
from captioner.commands.train import config_from_args
from captioner.train_config import TrainConfig

REQUIRED = ["train", "--data-dir", "DATA", "--output", "OUT"]


def train_options() -> dict[str, object]:
    """``captioner train``'s options (dest -> default), without the top-level and process-only ones."""
    args = vars(build_parser().parse_args(REQUIRED))
    return {k: v for k, v in args.items() if k not in ("command", "func", "verbose")}


def test_every_option_is_a_field_with_the_same_default() -> None:
    options = train_options()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(options) == set(fields)
    config = config_from_args(build_parser().parse_args(REQUIRED))
    assert config == TrainConfig(data_dir="DATA", output="OUT")
    assert dataclasses.asdict(config) == options


def test_options_given_on_the_command_line_reach_the_config() -> None:
    args = build_parser().parse_args(
        [
            *REQUIRED,
            "--epochs",
            "3",
            "--no-tune-decoding",
            "--scst-epochs",
            "2",
            "--annotations",
            "train=a.csv",
            "--annotations",
            "dev=b.csv",
            "--lr",
            "2e-4",
        ]
    )
    config = config_from_args(args)
    assert (config.epochs, config.tune_decoding, config.scst_epochs, config.lr) == (3, False, 2, 2e-4)
    assert config.annotations == ["train=a.csv", "dev=b.csv"]


def test_required_fields_have_no_default() -> None:
    with pytest.raises(TypeError):
        TrainConfig(output="OUT")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        TrainConfig(data_dir="DATA")  # type: ignore[call-arg]
