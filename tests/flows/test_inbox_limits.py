"""The inbox under the brief limits (issue 28: "the scheduled inbox renders whatever lands in its folder"): a file
over ``brief_max_bytes`` is rejected from its size before it is read or downloaded, the other caps (as configured)
reject a brief before a run starts, and good briefs beside them still render."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.inbox import _read_entry, _TooBig, inbox_run, list_inbox

pytestmark = pytest.mark.usefixtures("campaign_caches")


def _brief(row: str, rows: int = 1) -> str:
    return "campaign,row_id,subject,channels,variants\n" + "".join(
        f"inbox,{row}{i or ''},a red circle,instagram_square,1\n" for i in range(rows))


def test_local_file_over_the_cap_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.csv"
    with open(big, "wb") as f:
        f.truncate(2**30)  # sparse: 1 GiB that reading would allocate
    store, [entry] = list_inbox(str(tmp_path))
    with pytest.raises(_TooBig) as info:
        _read_entry(store, entry, 16 * 2**20)
    assert info.value.size == 2**30


def test_s3_object_over_the_cap_is_not_downloaded(s3_endpoint: str, s3_bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="inbox/big.csv", Body=b"x" * 5000)
    client.put_object(Bucket=s3_bucket, Key="inbox/small.csv", Body=b"y" * 100)
    store, entries = list_inbox(f"s3://{s3_bucket}/inbox?endpoint_url={s3_endpoint}")
    by_name = {e.file_name: e for e in entries}
    with pytest.raises(_TooBig) as info:
        _read_entry(store, by_name["big.csv"], 1000)
    assert info.value.size == 5000
    assert _read_entry(store, by_name["small.csv"], 1000) == b"y" * 100


def test_inbox_rejects_briefs_past_the_configured_caps(tmp_path: Path, campaign_model: Path, sqlite_db_url: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with open(inbox / "1-huge.csv", "wb") as f:
        f.truncate(17 * 2**20)
    (inbox / "2-rows.csv").write_text(_brief("row", rows=5))
    (inbox / "3-good.csv").write_text(_brief("good"))
    settings = {"model": str(campaign_model), "db_url": sqlite_db_url, "store_url": str(tmp_path / "assets"),
                "steps": 1, "brief_max_rows": 3}
    result = inbox_run(str(inbox), overrides=settings)
    by_name = {Path(b["brief"]).name: b for b in result["briefs"]}
    assert {n: b["status"] for n, b in by_name.items()} == {"1-huge.csv": "rejected", "2-rows.csv": "rejected",
                                                            "3-good.csv": "rendered"}
    assert by_name["1-huge.csv"]["problems"] == [
        f"{inbox / '1-huge.csv'}: cannot read file: it is 17825792 bytes, more than the 16777216 allowed "
        "(setting brief_max_bytes)"]
    assert by_name["2-rows.csv"]["problems"] == [
        f"{inbox / '2-rows.csv'}:5: the brief has more than 3 rows (setting brief_max_rows); reading stopped here"]
    assert by_name["2-rows.csv"]["run_id"] is None and by_name["3-good.csv"]["counts"]["rendered"] == 1
