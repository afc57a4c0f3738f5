"""The ``fast`` setting (flows/fast_setting.py): a brief row's ``fast`` cell, a channel's ``fast:`` key and the run's
``fast`` setting, the most specific winning; canonical text in the plan's identities; bad text as a problem naming
file, line and column (or file and key); and a planned fast variant recorded and rendered with its mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.brief import read_brief
from flows.channels import load_channels
from flows.model_registry import describe_model
from flows.planning import Plan, plan_brief
from flows.settings import SettingsError, load_settings
from flows.styles import load_styles
from flows.template_config import TemplatingConfigError
from tests.helpers import write_brief, write_text

HEADER = ["campaign", "row_id", "subject", "channels", "variants", "seed", "fast"]
CHANNELS = """channels:
  feed:
    width: 64
    height: 64
    format: png
    max_kb: 500
    fast: Cache:3
  print:
    width: 64
    height: 96
    format: png
    max_kb: 500
    fast: off
  plain:
    width: 96
    height: 64
    format: png
    max_kb: 500
"""


def _row(row_id: str, fast: str = "", channels: str = "feed, print, plain", **more: Any) -> dict[str, Any]:
    return {"campaign": "Spring", "row_id": row_id, "subject": f"a shoe {row_id}", "channels": channels,
            "variants": 1, "seed": 10, "fast": fast, **more}


def _plan(tmp_path: Path, model: Path, rows: list[dict[str, Any]], *, run_fast: str | None = None,
          header: list[str] = HEADER, name: str = "brief.csv", channels_yaml: str = CHANNELS) -> Plan:
    channels = load_channels(write_text(tmp_path / "channels.yaml", channels_yaml))
    brief = read_brief(write_brief(tmp_path / name, rows, header), known_channels=set(channels))
    settings = load_settings({"fast": run_fast, "model_dirs": str(model.parent)}, env={}, cwd=tmp_path)
    return plan_brief(brief, settings, channels=channels, styles=load_styles(), resolve_model=describe_model,
                      default_model=model)


def _fast_by(plan: Plan) -> dict[tuple[str, str], str]:
    return {(v.row.row_id, v.channel.name): v.spec.fast for v in plan.variants}


# ------------------------------------------------------------------------------------------------ cells and keys


def test_a_brief_cell_is_read_as_canonical_text(tmp_path: Path) -> None:
    """"Cache:3 " is cache:3, "off" is "" (exact, overriding the channel), an empty cell is None (the channel's)."""
    rows = [_row("a", "Cache:3 "), _row("b", "tome:0.5, CACHE:2"), _row("c", "off"), _row("d", "")]
    brief = read_brief(write_brief(tmp_path / "b.csv", rows, HEADER), strict=True)
    assert [r.fast for r in brief.rows] == ["cache:3", "cache:2,tome:0.5", "", None]
    assert "fast" not in brief.rows[0].extra  # a setting, not a template variable


def test_a_bad_cell_is_a_problem_on_its_row_and_column(tmp_path: Path) -> None:
    rows = [_row("ok", "cache:3"), _row("bad", "warp:9"), _row("worse", "cache:0"), _row("long", "cache:" + "9" * 500)]
    path = write_brief(tmp_path / "b.csv", rows, HEADER)
    brief = read_brief(path)
    assert [r.row_id for r in brief.rows] == ["ok"]
    bad, worse, long = brief.problems
    assert (bad.line, bad.column, worse.line, worse.column, long.line) == (3, "fast", 4, "fast", 5)
    assert str(bad) == (f"{path}:3: column 'fast': fast mode 'warp:9': unknown part 'warp:9'; use cache:N, tome:R, "
                        "both comma-separated, or off")
    assert "cache interval must be 1..10, got 0" in worse.message
    assert "too long to be one" in long.message and "(506 characters)" in long.message
    assert all("\n" not in str(p) for p in brief.problems)


def test_a_channel_key_is_read_as_canonical_text(tmp_path: Path) -> None:
    channels = load_channels(write_text(tmp_path / "channels.yaml", CHANNELS))
    assert (channels["feed"].fast, channels["print"].fast, channels["plain"].fast) == ("cache:3", "", None)


@pytest.mark.parametrize(("value", "message"), [
    ("cache:x", "cache takes cache:N or cache:N:B"),
    ("3", "expected a fast mode as text"),
    ("yes", "expected a fast mode as text"),  # YAML's true
    ("[cache:3]", "expected a fast mode as text"),
])
def test_a_bad_channel_key_names_file_and_key(tmp_path: Path, value: str, message: str) -> None:
    path = write_text(tmp_path / "channels.yaml", f"channels:\n  bad:\n    width: 8\n    height: 8\n    format: png\n"
                                                  f"    max_kb: 5\n    fast: {value}\n")
    with pytest.raises(TemplatingConfigError) as info:
        load_channels(path)
    assert str(info.value).startswith(f"{path}: key 'channels.bad.fast': ") and message in str(info.value)


def test_the_run_setting_is_canonical_and_checked(tmp_path: Path) -> None:
    assert load_settings({"fast": " Tome:0.5 "}, env={}, cwd=tmp_path).fast == "tome:0.5"
    assert load_settings(env={}, cwd=tmp_path).fast == ""
    write_text(tmp_path / "adforge.toml", 'fast = "cache:4"\n')
    assert load_settings(env={}, cwd=tmp_path).fast == "cache:4"
    with pytest.raises(SettingsError, match=r"^command line: 'fast': fast mode 'cache:3:x': cache takes"):
        load_settings({"fast": "cache:3:x"}, env={}, cwd=tmp_path)


# ------------------------------------------------------------------------------------------------ planning


def test_row_over_channel_over_run(tmp_path: Path, campaign_model: Path) -> None:
    rows = [_row("none"), _row("off", "off"), _row("own", "Cache:5")]
    plan = _plan(tmp_path, campaign_model, rows, run_fast="tome:0.5")
    assert plan.problems == []
    assert _fast_by(plan) == {
        ("none", "feed"): "cache:3", ("none", "print"): "", ("none", "plain"): "tome:0.5",
        ("off", "feed"): "", ("off", "print"): "", ("off", "plain"): "",
        ("own", "feed"): "cache:5", ("own", "print"): "cache:5", ("own", "plain"): "cache:5",
    }
    without_run = _plan(tmp_path, campaign_model, rows, name="again.csv")
    assert _fast_by(without_run)[("none", "plain")] == ""


def test_spellings_of_one_mode_plan_one_identity_and_exact_keeps_the_old_ones(tmp_path: Path, campaign_model: Path) -> None:
    plain = "channels:\n  plain:\n    width: 96\n    height: 64\n    format: png\n    max_kb: 500\n"
    one = _plan(tmp_path, campaign_model, [_row("r", "Cache:3 ", "plain")], name="one.csv", channels_yaml=plain)
    two = _plan(tmp_path, campaign_model, [_row("r", "cache:3", "plain")], name="two.csv", channels_yaml=plain)
    assert [v.identity for v in one.variants] == [v.identity for v in two.variants]
    # A brief without the column, one with it empty and one saying off plan what was always planned.
    header = [h for h in HEADER if h != "fast"]
    before = _plan(tmp_path, campaign_model, [_row("r", channels="plain")], header=header, name="before.csv",
                   channels_yaml=plain)
    empty = _plan(tmp_path, campaign_model, [_row("r", "", "plain")], name="empty.csv", channels_yaml=plain)
    off = _plan(tmp_path, campaign_model, [_row("r", "off", "plain")], name="off.csv", channels_yaml=plain)
    old = [v.identity for v in before.variants]
    assert old == [v.identity for v in empty.variants] == [v.identity for v in off.variants]
    assert old != [v.identity for v in one.variants]
    assert before.variants[0].batch_group != one.variants[0].batch_group  # never one U-Net batch


def test_a_bad_cell_skips_its_row_when_planning(tmp_path: Path, campaign_model: Path) -> None:
    plan = _plan(tmp_path, campaign_model, [_row("ok"), _row("bad", "cache:2:x")])
    assert {v.row.row_id for v in plan.variants} == {"ok"}
    [problem] = plan.problems
    assert (problem.line, problem.column) == (3, "fast") and "cache takes cache:N or cache:N:B" in problem.message


def test_a_fast_variant_is_recorded_and_rendered_with_its_mode(tmp_path: Path, campaign_model: Path) -> None:
    """Planned with cache:3: the variants row holds it, the engine request gets it, and the stored file's infotext
    says so (what the engine does with it is its own business: the pixels are not looked at)."""
    from flows.campaign import close_resources, open_resources, plan_run, validate_brief
    from flows.recording import start_run
    from flows.rendering import render_variants
    from storage.database import sqlite_url
    from storage.image_metadata import parse_infotext
    from storage.schema import Asset, Variant
    from storage.variants import load_variants

    brief = write_brief(tmp_path / "brief.csv", ["c1,r1,a red circle,instagram_square,1,5,Cache:3"], HEADER)
    settings = load_settings({"db_url": sqlite_url(tmp_path / "a.db"), "store_url": str(tmp_path / "assets"),
                              "model": str(campaign_model), "steps": 3, "device": "cpu"}, env={}, cwd=tmp_path)
    planned = plan_run.fn(validate_brief.fn(str(brief), False, None), settings, False, None)
    [[variant_id]] = planned.batches
    db, store = open_resources(settings)
    try:
        with db.session() as s:
            assert s.get(Variant, variant_id).fast == "cache:3"
            assert load_variants(s, [variant_id])[variant_id].spec.fast == "cache:3"
        run_id = start_run(db, str(brief), None, settings, None)
        counts = render_variants([variant_id], db=db, store=store, run_id=run_id, device="cpu", dtype="float32",
                                 batch_size=1)
        assert counts.rendered == 1, counts
        with db.session() as s:
            infotext = s.query(Asset).filter_by(variant_id=variant_id).one().infotext
    finally:
        close_resources()
    assert 'Fast: "cache:3"' in infotext  # a value holding ':' is JSON-quoted, as A1111 writes it
    assert parse_infotext(infotext)[2]["Fast"] == "cache:3"
