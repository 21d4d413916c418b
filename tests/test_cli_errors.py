"""A user error a verb does not turn into its own line still ends as one line and the exit code of the table
in mixlm.errors, never a traceback."""

import sys
import types

import pytest

from mixlm import cli, errors


@pytest.mark.parametrize("error, code", [
    (errors.DataError("shard x is corrupt; re-run `mixlm prepare`"), 5),
    (errors.CheckpointError("no usable checkpoint in runs/a; rerun train"), 4),
    (errors.RunFolderLockedError("runs/a is in use by another mixlm run"), 2),
    (errors.PrepareError("raw.jsonl.zst is cut short"), 1),
    (errors.NonFiniteLossError("loss is nan at step 3"), 3),
])
def test_an_unhandled_user_error_is_one_line_and_its_exit_code(monkeypatch, capsys, error, code):
    def run(args):
        raise error

    verb = types.ModuleType("mixlm.commands.fake_verb")
    verb.add_arguments, verb.run = (lambda parser: None), run
    monkeypatch.setitem(sys.modules, "mixlm.commands.fake_verb", verb)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_verb", "a verb that fails"))
    assert cli.main(["fake"]) == code == errors.exit_code(error)
    err = capsys.readouterr().err
    assert err == f"mixlm fake: {error}\n"


def test_anything_else_is_still_a_traceback_for_a_bug(monkeypatch):
    verb = types.ModuleType("mixlm.commands.fake_verb")
    verb.add_arguments, verb.run = (lambda parser: None), (lambda args: 1 / 0)
    monkeypatch.setitem(sys.modules, "mixlm.commands.fake_verb", verb)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_verb", "a verb with a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["fake"])
