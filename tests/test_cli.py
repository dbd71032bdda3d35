"""The CLI reports the user's mistakes as one line (exit 2) and lets a bug keep its traceback."""
from __future__ import annotations

import pytest

import dompre.cli as cli
from dompre.errors import REPORTED, UnknownName, UserError


def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["finetune", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dompre finetune: error: ") and "missing.yaml" in err and len(err.splitlines()) == 1
    assert cli.main(["finetune", str(tmp_path / "missing.yaml"), "train.nosuchkey=1"]) == 2


def test_an_unknown_name_reads_as_a_sentence_not_a_quoted_key(capsys, monkeypatch):
    def unknown(args):
        raise UnknownName("label 'liverr' is not one of the model's labels")
    monkeypatch.setattr(cli, "_run_finetune", unknown)
    assert cli.main(["finetune", "r.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "dompre finetune: error: label 'liverr' is not one of the model's labels"


@pytest.mark.parametrize("bug", [ValueError("shapes (3,) and (4,) not aligned"), KeyError("weight"), TypeError("x")])
def test_an_internal_error_keeps_its_traceback(monkeypatch, bug):
    def broken(args):
        raise bug
    monkeypatch.setattr(cli, "_run_finetune", broken)
    with pytest.raises(type(bug)):
        cli.main(["finetune", "r.yaml"])


def test_user_errors_are_value_errors_for_library_callers():
    assert issubclass(UserError, ValueError) and issubclass(UnknownName, KeyError)
    assert UserError in REPORTED and ValueError not in REPORTED and KeyError not in REPORTED
