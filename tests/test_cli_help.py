"""The command line's help: every option says what it does, and each command lists only the flags it uses."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from finpulse.cli import build_parser, main

# The shared flags, by the group they belong to.
KAFKA = "--bootstrap-servers"
HISTORY = "--duckdb-path"
ADAPTERS = "--adapters-dir"
DEVICE = "--device"
METRICS = "--metrics-port"
SHARED = (KAFKA, HISTORY, ADAPTERS, DEVICE, METRICS)


def _actions(parser: argparse.ArgumentParser, prog: str) -> Iterator[tuple[str, argparse.Action]]:
    """Yield (command, action) for every action of `parser` and of its sub-commands, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue  # argparse's own -h
        yield prog, action
        if isinstance(action, argparse._SubParsersAction):
            yield from ((prog, choice) for choice in action._choices_actions)
            for name, child in action.choices.items():
                yield from _actions(child, f"{prog} {name}")


def test_every_option_and_positional_has_help() -> None:
    actions = list(_actions(build_parser(), "finpulse"))
    assert len(actions) > 100, "the walk reaches every sub-command"
    missing = [
        f"{prog}: {'/'.join(action.option_strings) or action.dest}"
        for prog, action in actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert not missing, "add help= to: " + ", ".join(missing)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "listed"),
    [
        (["score"], SHARED),
        (["config"], SHARED),  # it prints what every flag would set
        (["demo"], (KAFKA, HISTORY, ADAPTERS, DEVICE)),  # its /metrics takes any free port
        (["bench"], (KAFKA, HISTORY, ADAPTERS, DEVICE)),
        (["learn"], (KAFKA, HISTORY, ADAPTERS, METRICS)),
        (["label", "send"], (KAFKA, HISTORY)),
        (["label", "suggest"], (HISTORY,)),
        (["models", "list"], (HISTORY, ADAPTERS)),
        (["models", "promote"], (KAFKA, HISTORY, ADAPTERS)),  # announces on model.updates
        (["models", "rollback"], (KAFKA, HISTORY, ADAPTERS)),
        (["bootstrap"], (ADAPTERS,)),
        (["query"], (HISTORY,)),
        (["compact"], (HISTORY,)),
        (["plot", "sentiment"], (HISTORY,)),
        (["subscribe"], (HISTORY,)),
        (["dispatch"], (HISTORY,)),
        (["kafka"], ()),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_a_command_lists_only_the_shared_flags_it_uses(
    argv: list[str], listed: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    shown = _help(argv, capsys)
    for flag in ("--config", "--set", "--verbose"):
        assert flag in shown
    assert [flag for flag in SHARED if flag in shown] == list(listed)


def test_a_flag_of_another_command_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["subscribe", "fx-desk", "--url", "https://hooks.example.com/x", KAFKA, "b1:9092"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unrecognized arguments: {KAFKA} b1:9092" in err


def test_help_states_the_built_in_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    shown = " ".join(_help(["score"], capsys).split())  # argparse wraps lines
    assert "default .finpulse/finpulse.duckdb" in shown and "default 9464" in shown and "default auto" in shown
