"""Results import under abuse: huge and duplicated files, huge numbers, huge cells. Every problem is a line of the
file with what was wrong; the list is capped; reading stops at the row cap; look-ups go in batches."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, select

import review.results as results_module
from review.results import ResultsError, import_results, parse_results
from review.results_csv import MAX_LINE_CHARS, ROWS_ENV
from storage.assets import LocalAssetStore
from storage.database import Database
from storage.review_schema import ABResult
from tests.review.world import World, build_world

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")


@pytest.fixture
def world(db: Database, tmp_path: Path) -> World:
    store = LocalAssetStore(tmp_path / "assets")
    return build_world(db, store, str(tmp_path / "assets"), per_channel=3)


def _first_asset(w: World) -> int:
    return w.asset_of(w.variants[("hero-01", "instagram_square")][0])


def _stored(w: World) -> list[tuple]:
    with w.db.session() as s:
        return [tuple(r) for r in s.execute(select(ABResult.asset_id, ABResult.impressions).order_by(ABResult.asset_id))]


def _rejected(w: World, text: str, **kw) -> list[str]:
    before = _stored(w)
    with pytest.raises(ResultsError) as info:
        import_results(w.db, text.encode(), "r.csv", actor="rita", **kw)
    assert _stored(w) == before  # all or nothing
    return info.value.problems


def _statements(db: Database) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", count)


def test_duplicate_rows_are_one_clear_bounded_answer_with_batched_lookups(world: World) -> None:
    aid = _first_asset(world)
    text = "asset_id,impressions,clicks\n" + f"{aid},100,5\n" * 5000
    gen = _statements(world.db)
    seen = next(gen)
    problems = _rejected(world, text)
    gen.close()
    assert problems[0] == f"r.csv:3: asset {aid} is listed twice (also on line 2)"
    assert len(problems) == 52  # the first 50, then how many more, then what the repeats mean
    assert problems[49] == f"r.csv:52: asset {aid} is listed twice (also on line 2)"
    assert problems[50] == "... and 4949 more problem(s) not listed"
    assert problems[51].startswith("4999 row(s) name an asset an earlier row already named")
    # One query per 500 rows (plus the export names), not one per row.
    assert len([q for q in seen if "FROM assets" in q]) <= 5000 // results_module.LOOKUP_CHUNK + 1


def test_lookups_span_chunks_and_good_files_import(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results_module, "LOOKUP_CHUNK", 5)
    assets = sorted(world.assets.values())
    by_name = {aid: world.keys[aid] for aid in assets[::2]}  # every other asset by its storage key
    lines = ["asset_id,file_name,impressions,clicks,conversions"]
    for n, aid in enumerate(assets):
        lines.append(f",{by_name[aid]},{1000 + n},{n},1" if aid in by_name else f"{aid},,{1000 + n},{n},1")
    summary = import_results(world.db, ("\n".join(lines) + "\n").encode(), "r.csv", actor="rita")
    assert (summary.rows, summary.changed, summary.campaign_ids) == (12, 12, [world.campaign_id])
    with world.db.session() as s:
        stored = {x.asset_id: (x.impressions, x.clicks) for x in s.scalars(select(ABResult))}
    assert stored == {aid: (1000 + n, n) for n, aid in enumerate(assets)}
    # A repeat in a later chunk is still caught.
    problems = _rejected(world, "\n".join(lines + [lines[1]]) + "\n")
    assert problems == [f"r.csv:14: asset {assets[0]} is listed twice (also on line 2)"]


def test_huge_negative_and_garbage_numbers_are_row_and_column_problems(world: World) -> None:
    aid = _first_asset(world)
    text = (
        "asset_id,impressions,clicks\n"
        f"{2**63},10,1\n"
        "99999999999999999999999999,10,1\n"
        f"{aid},{2**63},1\n"
        f"{aid},1000000000000001,1\n"
        f"{aid},-5,1\n"
        f"{aid},ten,1\n"
        f"{aid},{'9' * 5000},1\n"
        f"-{aid},10,1\n"
        f"{2**63 - 1},10,1\n"
    )
    problems = _rejected(world, text)
    assert problems[0] == f"r.csv:2: column 'asset_id': '{2**63}' is too large to be an asset id"
    assert problems[1] == "r.csv:3: column 'asset_id': '99999999999999999999999999' is too large to be an asset id"
    assert problems[2] == f"r.csv:4: column 'impressions': '{2**63}' is above the limit of 10^15"
    assert problems[3] == "r.csv:5: column 'impressions': '1000000000000001' is above the limit of 10^15"
    assert problems[4] == "r.csv:6: column 'impressions': '-5' is not a whole number >= 0"
    assert problems[5] == "r.csv:7: column 'impressions': 'ten' is not a whole number >= 0"
    assert problems[6].startswith("r.csv:8: column 'impressions': '999") and "(5000 characters) is above the limit" in problems[6]
    assert problems[7] == f"r.csv:9: column 'asset_id': '-{aid}' is not an asset id"
    assert problems[8] == f"r.csv:10: no asset {2**63 - 1}"  # the largest id there can be: looked up, not crashed
    assert len(problems) == 9
    assert max(map(len, problems)) < 200


def test_a_cell_over_the_csv_field_limit_names_its_line(world: World) -> None:
    aid = _first_asset(world)
    text = f"asset_id,file_name,impressions,clicks\n{aid},,10,1\n,{'x' * 140_000},10,1\n{aid},,10,1\n"
    assert _rejected(world, text) == ["r.csv:3: a cell longer than 131072 characters"]
    # Under the csv limit but over the file-name limit: a short problem, not the name echoed back.
    text = f"file_name,impressions,clicks\n{'y' * 100_000},10,1\n"
    [problem] = _rejected(world, text)
    assert problem.startswith("r.csv:2: column 'file_name': 'yyy") and "(100000 characters) is longer than 1024" in problem
    assert len(problem) < 200


def test_a_line_without_end_stops_at_the_line_cap(world: World) -> None:
    text = "asset_id,impressions,clicks\n" + "1," * (MAX_LINE_CHARS // 2 + 10)
    assert _rejected(world, text) == [f"r.csv:2: line longer than {MAX_LINE_CHARS} characters: not a results file"]


def test_rows_are_capped_while_reading(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    aid = _first_asset(world)
    good = "".join(f"{a},10,1\n" for a in sorted(world.assets.values()))
    # Line 15 is the 13th data row: over a cap of 12; the garbage after it is never read.
    text = "asset_id,impressions,clicks\n" + good + "\n" + f"{aid},10,1\n" + "junk,junk,junk\n" * 10
    assert _rejected(world, text, max_rows=12) == [
        f"r.csv:15: more than 12 data rows, the limit for one results file ({ROWS_ENV} sets it): split the file"]
    monkeypatch.setenv(ROWS_ENV, "3")
    assert _rejected(world, text)[-1].startswith("r.csv:5: more than 3 data rows")
    monkeypatch.setenv(ROWS_ENV, "0")
    with pytest.raises(ValueError, match=f"{ROWS_ENV} must be a whole number >= 1"):
        import_results(world.db, text.encode(), "r.csv", actor="rita")
    monkeypatch.delenv(ROWS_ENV)
    assert import_results(world.db, ("asset_id,impressions,clicks\n" + good).encode(), "r.csv", actor="rita").rows == 12


def test_many_problems_list_the_first_ones_in_file_order(world: World) -> None:
    text = "asset_id,impressions,clicks\n" + "".join(f"{10**6 + n},{'x' if n % 2 else 10},1\n" for n in range(300))
    problems = _rejected(world, text, max_problems=20)
    assert len(problems) == 21 and problems[-1] == "... and 280 more problem(s) not listed"
    lines = [int(p.split(":")[1]) for p in problems[:-1]]
    assert lines == list(range(2, 22))
    assert problems[0] == f"r.csv:2: no asset {10**6}" and problems[1] == "r.csv:3: column 'impressions': 'x' is not a whole number >= 0"


def test_utf16_and_bad_bytes(world: World) -> None:
    aid = _first_asset(world)
    text = f"asset_id\timpressions,clicks\n{aid},10,1\n".replace("\t", ",")
    assert import_results(world.db, text.encode("utf-16"), "r.csv", actor="rita").rows == 1
    with pytest.raises(ResultsError) as info:
        parse_results(b"asset_id,impressions,clicks\n1,10,1\n2,\xff\xfe10,1\n", "r.csv")
    assert info.value.problems == ["r.csv:3: not UTF-8 text"]
    with pytest.raises(ResultsError) as info:
        parse_results(b"asset_id,impressions,clicks\n1,10\x00,1\n", "r.csv")
    assert info.value.problems == ["r.csv:2: column 'impressions': '10\\x00' is not a whole number >= 0"]


def test_parse_reads_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["asset_id", "impressions", "clicks"])
        w.writerows([n, 100, n % 7] for n in range(1, 2001))
    with path.open("rb") as f:
        rows = parse_results(f, "r.csv")
    assert len(rows) == 2000 and rows[-1].line == 2001 and rows[-1].asset_id == 2000


def test_why_reading_stopped_is_listed_whatever_the_cap_kept(world: World) -> None:
    text = "asset_id,impressions,clicks\n" + "".join(f"{10**6 + n},ten,1\n" for n in range(30))
    problems = _rejected(world, text, max_rows=20, max_problems=5)
    assert problems[:5] == [f"r.csv:{n}: column 'impressions': 'ten' is not a whole number >= 0" for n in range(2, 7)]
    assert problems[5:] == ["... and 15 more problem(s) not listed",
                            f"r.csv:22: more than 20 data rows, the limit for one results file ({ROWS_ENV} sets it): split the file"]
