"""The ``cli`` package: the joined app lists every command, each command group also runs on its own, one error helper."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli import errors, models, review, tokens, train, users
from cli.app import app

runner = CliRunner()


def _names(group: typer.Typer) -> list[str]:
    ctx = typer.main.get_group(group).make_context("adforge", [], resilient_parsing=True)
    return typer.main.get_group(group).list_commands(ctx)


def test_the_joined_app_lists_the_documented_commands_in_order() -> None:
    assert _names(app) == ["generate", "run", "rerender", "plan", "runs", "assets", "gallery", "export",
                           "release", "verify", "models", "users", "tokens", "results", "audit", "train", "brand"]
    assert _names(models.app) == ["init-random", "init-random-upscaler", "inspect", "add", "list"]
    assert _names(users.app) == ["add", "list", "passwd", "role", "disable", "enable", "remove"]
    assert _names(review.app) == ["gallery", "export", "release"]
    assert _names(tokens.app) == ["create", "list", "revoke"]


def test_a_command_group_runs_on_its_own(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    res = runner.invoke(models.app, ["init-random", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = runner.invoke(models.app, ["inspect", str(path)], catch_exceptions=False)
    assert res.exit_code == 0 and "model hash:" in res.output
    # the same commands through the joined app
    res = runner.invoke(app, ["models", "inspect", str(path)], catch_exceptions=False)
    assert res.exit_code == 0 and "model hash:" in res.output


def test_commands_are_module_level_functions() -> None:
    assert callable(models.models_inspect) and callable(train.train_demo_command) and callable(users.users_list)
    assert callable(review.results_import) and callable(review.audit_export_command)


def test_fail_prints_one_escaped_line_and_returns_the_exit(capsys: pytest.CaptureFixture[str]) -> None:
    exit_ = errors.fail(ValueError("missing [key model.diffusion_model.out]"), 2)
    assert isinstance(exit_, typer.Exit) and exit_.exit_code == 2
    assert capsys.readouterr().err == "error: missing [key model.diffusion_model.out]\n"


def test_rejected_lists_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    exit_ = errors.rejected("brief", ["line 2: no subject", "line 3: [bad] channel"], "nothing was rendered or recorded")
    assert exit_.exit_code == 2
    assert capsys.readouterr().err.splitlines() == [
        "brief rejected (2 problem(s)); nothing was rendered or recorded:",
        "  line 2: no subject",
        "  line 3: [bad] channel",
    ]
