"""``adforge plan`` with the prompt blocklist: a blocked cell is a skipped row naming row, column and term;
``--blocklist off`` says the filter is off; a bad list file is one line, exit 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from tests.helpers import write_text

runner = CliRunner()


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("ADFORGE_DB_URL", "ADFORGE_STORE_URL", "ADFORGE_MODEL", "ADFORGE_CONFIG", "ADFORGE_BLOCKLIST"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _plan(*args: object):
    result = runner.invoke(app, ["plan", *map(str, args)])
    return result, re.sub(r"\s+", " ", result.output)


def test_plan_refuses_a_blocked_row_and_says_when_the_filter_is_off(in_tmp: Path, campaign_model: Path) -> None:
    brief = write_text(in_tmp / "b.csv", "campaign,row_id,subject,channels,variants\n"
                                         "c,ok,a cat,banner,1\n"
                                         "c,bad,a n.a.k.3.d cat,banner,1\n")
    result, out = _plan(brief, "--model", campaign_model)
    assert result.exit_code == 0, result.output
    assert "c / ok / banner" in out and "c / bad / banner" not in out
    assert f"{brief}:3: column 'subject': holds the blocked term 'naked'" in out and "content filter: off" not in out
    result, out = _plan(brief, "--model", campaign_model, "--blocklist", "off")
    assert result.exit_code == 0 and "c / bad / banner" in out and "content filter: off" in out
    result, out = _plan(brief, "--model", campaign_model, "--strict")
    assert result.exit_code != 0 and "holds the blocked term 'naked'" in out
    result, out = _plan(brief, "--model", campaign_model, "--blocklist", "nowhere.txt")
    assert result.exit_code == 2 and "'blocklist':" in out and "nowhere.txt: cannot read blocklist" in out
    assert "Traceback" not in result.output


def test_generate_refuses_a_blocked_prompt_before_loading_the_model(in_tmp: Path) -> None:
    """``adforge generate``'s prompt meets the same list as a campaign's rendered prompts; the model named does not
    even exist, so a refusal that names the term proves the check runs first."""
    missing = in_tmp / "no-such-model.safetensors"
    result = runner.invoke(app, ["generate", "a t.o.p.l.e.s.s model on a beach", "--model", str(missing)])
    out = re.sub(r"\s+", " ", result.output)
    assert result.exit_code == 2 and "the prompt holds the blocked term 'topless'" in out, out
    assert not (in_tmp / "out").exists()
    own = write_text(in_tmp / "terms.txt", "beach\n")
    result = runner.invoke(app, ["generate", "a model on a beach", "--model", str(missing), "--blocklist", str(own)])
    assert result.exit_code == 2 and "blocked term 'beach'" in re.sub(r"\s+", " ", result.output)
    # The negative prompt is not checked, and with the list off the prompt reaches the model loader.
    result = runner.invoke(app, ["generate", "a model on a beach", "--negative", "nsfw", "--model", str(missing),
                                 "--blocklist", "off"])
    out = re.sub(r"\s+", " ", result.output)
    assert result.exit_code != 0 and "blocked term" not in out and "no-such-model" in out
    result = runner.invoke(app, ["generate", "a cat", "--model", str(missing), "--blocklist", str(in_tmp / "gone.txt")])
    assert result.exit_code == 2 and "--blocklist:" in result.output and "cannot read blocklist" in result.output
