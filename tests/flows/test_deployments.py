"""prefect.yaml really deploys (the Prefect CLI against a real API server), and the inbox flow it schedules picks up
new briefs from a folder and from an S3 prefix, once per content."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import boto3
import pytest
from sqlalchemy import func, select

from flows.deployment_runs import cancel_flow_run, flow_run_state, start_flow_run
from flows.inbox import inbox_run
from storage.database import open_database
from storage.schema import Asset, Run
from tests.helpers import ROOT, run_prefect

pytestmark = pytest.mark.usefixtures("campaign_caches")


# ------------------------------------------------------------------------------------------------ prefect deploy


def test_prefect_deploy_all(prefect_harness: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments.steps.core import StepExecutionError, run_steps
    from prefect.exceptions import PrefectHTTPStatusError

    spec = (ROOT / "prefect.yaml").read_bytes()
    had_dot_prefect = (ROOT / ".prefect").exists()
    # The harness sets PREFECT_API_URL in this process's settings context only: subprocesses need it spelled out.
    env = dict(os.environ, PREFECT_API_URL=prefect_harness)
    run_prefect("work-pool", "create", "adforge", "--type", "process", "--overwrite", env=env)
    run_prefect("--no-prompt", "deploy", "--all", env=env)
    # Deploying must not rewrite prefect.yaml or leave Prefect files in the checkout.
    assert (ROOT / "prefect.yaml").read_bytes() == spec
    assert (ROOT / ".prefect").exists() == had_dot_prefect

    with get_client(sync_client=True) as client:
        assert client.read_work_pool("adforge").type == "process"
        run = client.read_deployment_by_name("campaign-run/campaign-run")
        inbox = client.read_deployment_by_name("campaign-inbox/campaign-inbox")

        assert (run.entrypoint, run.work_pool_name) == ("flows/campaign.py:campaign_run", "adforge")
        assert run.parameters == {} and run.schedules == []
        assert "brief_path" in run.parameter_openapi_schema["required"]
        assert run.enforce_parameter_schema
        # On demand: the server itself refuses a run without a brief and accepts one with it.
        with pytest.raises(PrefectHTTPStatusError, match="brief_path"):
            client.create_flow_run_from_deployment(run.id, parameters={})
        flow_run = client.create_flow_run_from_deployment(run.id, parameters={"brief_path": "briefs/x.csv"})
        client.delete_flow_run(flow_run.id)  # no worker in this test: it would wait forever
        # The gallery's submissions start, watch and cancel flow runs of this deployment through flows.deployment_runs.
        submitted = start_flow_run("campaign-run/campaign-run", {"brief_path": "briefs/x.csv", "submission_id": 7})
        assert client.read_flow_run(submitted).parameters["submission_id"] == 7
        assert flow_run_state(submitted) == "SCHEDULED"
        cancel_flow_run(submitted)
        assert flow_run_state(submitted) in ("CANCELLING", "CANCELLED")
        client.delete_flow_run(submitted)

        assert (inbox.entrypoint, inbox.work_pool_name) == ("flows/inbox.py:inbox_run", "adforge")
        assert inbox.parameters == {"inbox": "briefs/inbox"}
        [schedule] = inbox.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("*/15 * * * *", "UTC", True)
        assert inbox.global_concurrency_limit is not None and inbox.global_concurrency_limit.limit == 1
        assert inbox.concurrency_options.collision_strategy == "CANCEL_NEW"

    # The pull steps as stored: the worker's ADFORGE_PROJECT_DIR at run time, else /opt/adforge.
    assert run.pull_steps == inbox.pull_steps
    monkeypatch.chdir(tmp_path)  # set_working_directory changes this process's folder; the fixture restores it
    project = tmp_path / "checkout"
    project.mkdir()
    monkeypatch.setenv("ADFORGE_PROJECT_DIR", str(project))
    assert asyncio.run(run_steps(run.pull_steps))["directory"] == str(project)
    assert Path.cwd() == project
    monkeypatch.delenv("ADFORGE_PROJECT_DIR")
    if Path("/opt/adforge").exists():
        return  # a machine with a real checkout there: the default works, no failure to look for
    with pytest.raises(StepExecutionError) as err:  # no such folder here, but it is the one the worker looked for
        asyncio.run(run_steps(run.pull_steps))
    assert isinstance(err.value.__cause__, FileNotFoundError) and "/opt/adforge" in str(err.value.__cause__)


# ------------------------------------------------------------------------------------------------ inbox


def _brief(campaign: str, row: str, variants: int = 1, channel: str = "instagram_square") -> str:
    return f"campaign,row_id,subject,channels,variants\n{campaign},{row},a red circle,{channel},{variants}\n"


@pytest.fixture
def settings(tmp_path: Path, campaign_model: Path, sqlite_db_url: str) -> dict:
    return {"model": str(campaign_model), "db_url": sqlite_db_url, "store_url": str(tmp_path / "assets"), "steps": 1}


def _statuses(result: dict) -> dict[str, str]:
    return {Path(b["brief"]).name: b["status"] for b in result["briefs"]}


def test_local_inbox_renders_each_new_brief_once(tmp_path: Path, settings: dict) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.csv").write_text(_brief("inbox", "a", 2))
    (inbox / "b.csv").write_text(_brief("inbox", "b"))
    (inbox / "a-copy.csv").write_text(_brief("inbox", "a", 2))  # same content under another name
    (inbox / "~$b.xlsx").write_bytes(b"Excel lock file")
    (inbox / ".c.csv.part").write_text("half an upload")
    (inbox / "notes.txt").write_text("not a brief")
    (inbox / "done").mkdir()
    (inbox / "done" / "old.csv").write_text(_brief("inbox", "old"))  # sub-folders are not entered

    first = inbox_run(str(inbox), overrides=settings)
    assert _statuses(first) == {"a-copy.csv": "rendered", "a.csv": "skipped", "b.csv": "rendered"}
    by_name = {Path(b["brief"]).name: b for b in first["briefs"]}
    assert by_name["a-copy.csv"]["counts"]["rendered"] == 2 and by_name["b.csv"]["counts"]["rendered"] == 1
    assert by_name["a.csv"]["problems"] == [f"{inbox / 'a.csv'}: same content as {inbox / 'a-copy.csv'}"]
    assert first["counts"] == {"rendered": 2, "skipped": 1}

    again = inbox_run(str(inbox), overrides=settings)
    assert set(_statuses(again).values()) == {"skipped"}
    assert {b["run_id"] for b in again["briefs"]} == {b["run_id"] for b in first["briefs"] if b["status"] == "rendered"}

    (inbox / "c.csv").write_text(_brief("inbox", "c"))
    third = inbox_run(str(inbox), overrides=settings)
    assert [b["brief"] for b in third["briefs"] if b["status"] == "rendered"] == [str(inbox / "c.csv")]

    db = open_database(settings["db_url"])
    with db.session() as s:
        assert s.scalar(select(func.count(Asset.id))) == 4
        assert sorted(s.scalars(select(Run.status))) == ["completed"] * 3
    db.dispose()


def test_rejected_brief_does_not_stop_the_others(tmp_path: Path, settings: dict) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "1-good.csv").write_text(_brief("inbox", "good"))
    (inbox / "2-bad.csv").write_text(_brief("inbox", "bad", channel="tiktok_vertical"))
    (inbox / "3-good.csv").write_text(_brief("inbox", "good-too"))

    result = inbox_run(str(inbox), strict=True, overrides=settings)
    assert _statuses(result) == {"1-good.csv": "rendered", "2-bad.csv": "rejected", "3-good.csv": "rendered"}
    [bad] = [b for b in result["briefs"] if b["status"] == "rejected"]
    assert bad["run_id"] is None
    [problem] = bad["problems"]
    assert problem.startswith(f"{inbox / '2-bad.csv'}:2: column 'channels': unknown channel 'tiktok_vertical'")
    # Rejected writes nothing, so the next pass reports it again (until it is fixed) and skips the rest.
    again = inbox_run(str(inbox), strict=True, overrides=settings)
    assert _statuses(again) == {"1-good.csv": "skipped", "2-bad.csv": "rejected", "3-good.csv": "skipped"}


def test_s3_inbox(tmp_path: Path, settings: dict, s3_endpoint: str, s3_bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key="inbox/spring.csv", Body=_brief("s3", "a").encode())
    s3.put_object(Bucket=s3_bucket, Key="inbox/broken.csv", Body=_brief("s3", "b", channel="nope").encode())
    s3.put_object(Bucket=s3_bucket, Key="inbox/archive/old.csv", Body=_brief("s3", "old").encode())
    url = f"s3://{s3_bucket}/inbox?endpoint_url={s3_endpoint}"

    result = inbox_run(url, strict=True, overrides=settings)
    by_name = {b["brief"]: b for b in result["briefs"]}
    assert set(by_name) == {f"s3://{s3_bucket}/inbox/spring.csv", f"s3://{s3_bucket}/inbox/broken.csv"}
    rendered = by_name[f"s3://{s3_bucket}/inbox/spring.csv"]
    assert rendered["status"] == "rendered" and rendered["counts"]["rendered"] == 1
    # Problems name the S3 object, not the temporary download.
    [problem] = by_name[f"s3://{s3_bucket}/inbox/broken.csv"]["problems"]
    assert problem.startswith(f"s3://{s3_bucket}/inbox/broken.csv:2: column 'channels': unknown channel 'nope'")
    assert len([p for p in (tmp_path / "assets").rglob("*") if p.is_file()]) == 1
    # The run and the brief are recorded under the S3 address the brief came from, not the temporary copy.
    from sqlalchemy import select

    from storage.database import open_database
    from storage.schema import Brief, Run

    db = open_database(settings["db_url"])
    with db.session() as s:
        run = s.get(Run, rendered["run_id"])
        assert run.brief_path == f"s3://{s3_bucket}/inbox/spring.csv"
        assert s.scalars(select(Brief.file_name)).all() == [f"s3://{s3_bucket}/inbox/spring.csv"]
    db.dispose()

    again = inbox_run(url, strict=True, overrides=settings)
    assert by_name.keys() == {b["brief"] for b in again["briefs"]}
    assert {b["brief"]: b["status"] for b in again["briefs"]}[f"s3://{s3_bucket}/inbox/spring.csv"] == "skipped"
