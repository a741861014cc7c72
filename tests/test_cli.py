"""The ``llava-lite`` command: every declared sub-command is there, the shipped cards' commands
parse to the settings their metrics record, and config dataclasses become flags and back."""

import argparse
import dataclasses
import json
import re
import shlex

import pytest

from llava_lite import cli
from llava_lite.lab import config as lab
from llava_lite.paths import PRETRAINED_DIR

LM_CONFIGS = (lab.LMArchitecture, lab.LMDocuments, lab.LMTraining, lab.LMRuntime)
CLIP_CONFIGS = (lab.ClipArchitecture, lab.ClipTexts, lab.ClipTraining, lab.ClipRuntime)
LM_CARD_FLAGS = (
    "--steps --batch-size --layout --lr-schedule --lm-hidden --lm-heads --lm-intermediate --qa-per-doc "
    "--text-share --device --workers --threads --eval-every --eval-scenes --checkpoint-every "
    "--eval-split --world --out"
).split()
CLIP_CARD_FLAGS = (
    "--patch-size --vision-width --vision-layers --text-layers --steps --batch-size --lr "
    "--weight-decay --init-temperature --describe-prob --shape-prob --seed --threads --eval-every "
    "--metric-scenes --counterfactual-images --no-bf16 --no-hard-negatives --init --device --preset "
    "--out"
).split()


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _flags(text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*", text))


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_declared_command_is_in_the_help(capsys):
    commands = _commands(cli.build_parser())
    assert len(commands) == len(cli.COMMANDS)  # each declaration adds one command
    expected = [
        "world",
        "coco",
        "instruct",
        "validate",
        "released",
        "backbones",
        "features",
        "train",
        "evaluate",
        "judge",
        "scienceqa",
        "ablate",
        "export",
        "chat",
        "tutorial",
    ]
    assert list(commands) == expected
    text = _help(capsys, [])
    for name in commands:
        assert re.search(rf"^\s+{name}\s", text, re.M), name
    assert set(_commands(commands["backbones"])) == {"lm", "clip"}


def test_every_command_runs_something():
    def leaves(parser, path):
        inner = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not inner:
            yield path, parser
        for action in inner:
            for name, sub in action.choices.items():
                yield from leaves(sub, path + [name])

    for path, parser in leaves(cli.build_parser(), []):
        if path:
            assert callable(parser.get_default("func")), f"`llava-lite {' '.join(path)}` has no function to run"


@pytest.mark.parametrize("backbone, flags", [("lm", LM_CARD_FLAGS), ("clip", CLIP_CARD_FLAGS)])
def test_backbones_help_lists_the_flags_the_shipped_cards_use(capsys, backbone, flags):
    listed = _flags(_help(capsys, ["backbones", backbone]))
    assert set(flags) <= listed, sorted(set(flags) - listed)


def _card_command(folder: str, backbone: str, after: str | None = None) -> list[str]:
    """The ``llava-lite backbones <backbone>`` command of a shipped card's README (the first one,
    or the first after the line ``after``), continuation lines joined."""
    lines = (PRETRAINED_DIR / folder / "README.md").read_text().splitlines()
    start = lines.index(after) + 1 if after else 0
    i = next(k for k in range(start, len(lines)) if lines[k].startswith(f"llava-lite backbones {backbone} "))
    text = lines[i]
    while text.endswith("\\"):
        i += 1
        text = text[:-1] + " " + lines[i]
    return shlex.split(text)[1:]


def _check_against_card(argv: list[str], folder: str, configs, skip=()) -> list:
    args = cli.build_parser().parse_args(argv)
    card = json.loads((PRETRAINED_DIR / folder / "metrics.json").read_text())["config"]
    parsed = [cli.config_from(args, cls) for cls in configs]
    for cfg in parsed:
        for f in dataclasses.fields(cfg):
            if f.name in card and f.name not in skip:
                assert getattr(cfg, f.name) == card[f.name], f.name
    return parsed


def test_the_tiny_lm_cards_command_parses_to_the_settings_its_metrics_record():
    argv = _card_command("tiny-lm", "lm")
    _check_against_card(argv, "tiny-lm", LM_CONFIGS)
    args = cli.build_parser().parse_args(argv)
    assert args.func and args.eval_split == "test" and args.out == "A"


def test_the_smaller_tiny_lm_cards_command_parses_to_the_settings_its_metrics_record():
    argv = _card_command("tiny-lm-small", "lm")
    _check_against_card(argv, "tiny-lm-small", LM_CONFIGS)
    assert cli.build_parser().parse_args(argv).lm_layers == 2


def test_the_tiny_clip_cards_command_parses_to_the_settings_its_metrics_record():
    argv = _card_command("tiny-clip", "clip", after="# C2")
    parsed = _check_against_card(argv, "tiny-clip", CLIP_CONFIGS, skip=("init",))  # a folder of the lab's machine
    assert cli.config_from(cli.build_parser().parse_args(argv), lab.ClipTraining).init == "C1"
    # the command a run records for its card parses back to the same settings
    args = cli.build_parser().parse_args(argv)
    line = cli.command_line(args, *parsed)
    assert line.startswith("llava-lite backbones clip ") and "--counterfactual-images" in line.split()
    again = cli.build_parser().parse_args(shlex.split(line)[1:])
    assert [cli.config_from(again, cls) for cls in CLIP_CONFIGS] == parsed
    assert (again.preset, again.out, again.world) == (args.preset, args.out, args.world)


@dataclasses.dataclass
class Demo:
    hidden_size: int = 8
    rate: float = 0.5
    name: str = "tiny"
    use_cache: bool = True
    verbose: bool = False
    limit: int | None = None
    weights: dict | None = dataclasses.field(default_factory=lambda: {"a": 1.0})


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.add_config_flags(parser, Demo())
    return parser


def test_config_flags_default_to_the_dataclass_and_round_trip():
    assert cli.config_from(_demo_parser().parse_args([]), Demo) == Demo()
    changed = Demo(hidden_size=16, rate=0.25, name="big", use_cache=False, verbose=True, limit=3, weights={"b": 2})
    argv = [
        "--hidden-size",
        "16",
        "--rate",
        "0.25",
        "--name",
        "big",
        "--no-use-cache",
        "--verbose",
        "--limit",
        "3",
        "--weights",
        '{"b": 2}',
    ]
    assert cli.config_from(_demo_parser().parse_args(argv), Demo) == changed


def test_boolean_config_flags_take_a_no_form_and_the_last_one_wins():
    parse = _demo_parser().parse_args
    assert parse(["--no-use-cache"]).use_cache is False and parse(["--use-cache"]).use_cache is True
    assert parse(["--verbose", "--no-verbose"]).verbose is False
    with pytest.raises(SystemExit):
        parse(["--hidden-size", "eight"])  # typed as the default is


def test_train_command_takes_a_seed():
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--stage", "2", "--seed", "3"]).seed == 3
    assert parser.parse_args(["train", "--stage", "1"]).seed is None  # the preset's
