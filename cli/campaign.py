"""``adforge run / rerender / plan / runs / assets``: campaign runs from a brief, and what they recorded."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from cli.errors import console, fail, print_problems, rejected
from cli.options import BlocklistOpt, ConfigOpt, DbOpt, FastOpt, ModelOpt, RefinerOpt, RefinerSwitchOpt, StoreOpt, load_settings
from flows.safe_text import visible

__all__ = ["app", "assets", "plan", "rerender", "run", "runs"]

app = typer.Typer()


def _quiet_prefect() -> None:
    """Keep Prefect's console chatter (and its temporary server's shutdown noise) out of the progress bar."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL", "CRITICAL")
    logging.getLogger("prefect.server").setLevel(logging.CRITICAL)


def _run_errors_off_console() -> None:
    """A failed task or flow run is logged by Prefect with its traceback; the command says what failed in one
    line instead. Those records still reach Prefect's API (its UI keeps them); only the console skips them.
    Call after Prefect set up its logging (importing the flows does)."""
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not getattr(handler, "_adforge_quiet_runs", False):
            handler.addFilter(lambda record: not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")))
            handler._adforge_quiet_runs = True  # type: ignore[attr-defined]


class _RateColumn(ProgressColumn):
    def __init__(self, started: float):
        super().__init__()
        self.started = started

    def render(self, task) -> Text:
        done = task.fields.get("rendered", 0)
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 and done else 0.0
        return Text(f"{rate:.2f} img/s")


def _shown(text: object) -> str:
    """Text that came from a brief (or a model file), for the terminal: control characters written as escapes
    (an ANSI sequence in a cell cannot recolour, move or hide output), then Rich markup escaped."""
    return escape(visible(str(text)))


def _existing_database(url: str):
    """The database if it exists and has our schema, else None: ``plan`` reads registered licences from it but
    must not create a file or a schema."""
    from sqlalchemy.engine import make_url

    from storage.database import open_database

    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() == "sqlite" and not (parsed.database and Path(parsed.database).is_file()):
        return None
    try:
        database = open_database(url, upgrade=False)
        if database.revision() is not None:
            return database
        database.dispose()
    except Exception:  # unreachable server, not a database: plan without registered licences
        pass
    return None


@app.command()
def run(
    brief: Annotated[Path, typer.Argument(help="Brief spreadsheet (.csv or .xlsx).")],
    strict: Annotated[bool, typer.Option(help="Reject the whole brief on any problem (default: skip bad rows).")] = False,
    db: DbOpt = None,
    store: StoreOpt = None,
    model: ModelOpt = None,
    refiner: RefinerOpt = None,
    refiner_switch: RefinerSwitchOpt = None,
    steps: Annotated[int | None, typer.Option(min=1, max=500, help="Sampling steps (default 25).")] = None,
    sampler: Annotated[str | None, typer.Option(help="Sampler (default DPM++ 2M Karras).")] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", min=0.0, help="CFG scale (default 7).")] = None,
    fast: FastOpt = None,
    blocklist: BlocklistOpt = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per engine batch (default 4).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    devices: Annotated[str | None, typer.Option(
        help="Render workers, one process per entry: all (every GPU), cpu, or cuda:0,cuda:1 (env ADFORGE_DEVICES).")] = None,
    fan_out: Annotated[int | None, typer.Option(
        "--fan-out", min=1, help="Render as N shards on the Prefect work pool's workers (env ADFORGE_FAN_OUT).")] = None,
    config: ConfigOpt = None,
    submission: Annotated[int | None, typer.Option(hidden=True, min=1, help="The gallery's submission this run is for.")] = None,
) -> None:
    """Render every variant a brief plans (skipping those that exist), store them, record everything."""
    _quiet_prefect()
    overrides = {"db_url": db, "store_url": store, "model": model, "refiner": refiner, "refiner_switch": refiner_switch,
                 "steps": steps, "sampler": sampler, "cfg_scale": cfg, "fast": fast, "batch_size": batch_size, "device": device, "devices": devices, "fan_out": fan_out,
                 "blocklist": blocklist}
    settings = load_settings(config, **overrides)  # bad settings fail here, before Prefect starts a server
    from flows.brief import BriefError
    from flows.campaign import campaign_run, set_progress_listener
    from flows.device_pool import DeviceError, PoolError
    from flows.prefect_server import start_temporary_server
    from flows.sharding import ShardError
    from storage.database import DatabaseError

    _run_errors_off_console()
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("done {task.fields[rendered]} · skipped {task.fields[skipped]} · [red]failed {task.fields[failed]}[/red]"),
        _RateColumn(started), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    ) as bar:
        task_id = bar.add_task("starting", total=None, rendered=0, skipped=0, failed=0)
        fields = {"rendered": 0, "skipped": 0, "failed": 0}

        upscaled = 0

        def on_event(event: str, count: int) -> None:
            nonlocal upscaled
            if event == "planned":
                bar.update(task_id, total=count, description="rendering")
                return
            if event == "upscaled":  # an image went through its channel's upscale chain (it is stored next)
                upscaled += count
                bar.update(task_id, description=f"rendering + upscaling ({upscaled} upscaled)")
                return
            if event not in fields:
                return
            fields[event] += count
            bar.update(task_id, advance=count, **fields)

        try:
            start_temporary_server()  # without PREFECT_API_URL: a server that dies with this process, even on kill -9
        except Exception as exc:
            bar.stop()
            raise fail(f"cannot start Prefect's temporary server: {str(exc).strip().splitlines()[0]}", 1) from None
        set_progress_listener(on_event)
        try:
            summary = campaign_run(os.fspath(brief), strict=strict, overrides={k: v for k, v in overrides.items() if v is not None},
                                   config=os.fspath(config) if config else None, submission_id=submission)
        except BriefError as exc:
            bar.stop()
            raise rejected("brief", exc.problems, "nothing was rendered or recorded") from None
        except (DeviceError, PoolError, ShardError, DatabaseError) as exc:
            bar.stop()
            raise fail(exc, 1) from None
        finally:
            set_progress_listener(None)
    print_problems([visible(p) for p in summary["problems"]], "rows skipped")
    c = summary["counts"]
    console.print(
        f"[bold]run {summary['run_id']}[/bold] {summary['status']}: planned {c['planned']}, rendered {c['rendered']}, "
        f"already there {c['skipped']}, failed {c['failed']} in {summary['seconds']:.1f} s"
    )
    if summary.get("shards"):
        runs = [r for shard in summary["shards"] for r in shard["flow_runs"]]
        workers = sorted({r["worker"] for r in runs if r["worker"]})
        console.print(f"shards:   {len(summary['shards'])} on {len(workers)} worker(s) ({escape(', '.join(workers))}), "
                      f"{len(runs) - len(summary['shards'])} re-submitted", soft_wrap=True)
    if settings.blocklist == "":
        console.print("content filter: off (blocklist setting); only the brief's own blocked_terms were checked")
    if summary.get("credentials"):
        console.print(f"content credentials: {escape(summary['credentials'])}", soft_wrap=True)
    if c.get("flagged"):
        console.print(f"flagged {c['flagged']} (kept from export until an admin releases them)")
    console.print(f"image filter: {escape(summary['image_filter'])}" if summary.get("image_filter") else
                  'image filter: off (no safety checker weights; see README "Image filter")', soft_wrap=True)
    marks = {"on": "on (each file's asset id, invisible; adforge verify reads it)", "off": "off (watermark setting)"}
    console.print(f"watermark: {escape(marks.get(settings.watermark, settings.watermark + ' in every file'))}",
                  soft_wrap=True)
    console.print(f"assets:   {escape(summary['store_url'])}", soft_wrap=True)
    console.print(f"database: {escape(summary['db_url'])}", soft_wrap=True)
    console.print(f"list them: adforge assets --run {summary['run_id']}")
    if c["failed"]:
        raise typer.Exit(1)


@app.command()
def rerender(
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many requests (default: all queued).")] = None,
    db: DbOpt = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Render the gallery's queued "re-render with these settings" requests."""
    _quiet_prefect()
    overrides = {"db_url": db, "store_url": store}
    load_settings(config, **overrides)
    from flows.prefect_server import start_temporary_server
    from flows.rerender import rerender_queue

    try:
        start_temporary_server()  # without PREFECT_API_URL: a server that dies with this process, even on kill -9
    except Exception as exc:
        raise fail(f"cannot start Prefect's temporary server: {str(exc).strip().splitlines()[0]}", 1) from None
    result = rerender_queue(overrides={k: v for k, v in overrides.items() if v is not None},
                            config=os.fspath(config) if config else None, limit=limit)
    c = result["counts"]
    console.print(f"run {result['run_id']}: rendered {c['rendered']}, already existed {c['reused']}, failed {c['failed']}")
    for outcome in result["requests"]:
        if outcome["status"] == "failed":
            console.print(f"  request {outcome['request']} failed: {escape(outcome.get('error', ''))}", soft_wrap=True)
    if c["failed"]:
        raise typer.Exit(1)


def _adapters_text(variants: list) -> str:
    """The adapters a row-channel uses, as a tail for its plan line: ``, LoRA acme-style 0.8 (apache-2.0), ...``."""
    seen: dict[tuple, str] = {}
    for v in variants:
        for a in v.adapters:
            if a.kind == "lora":
                strength = f" {a.te:g}" if a.te == a.unet else f" te {a.te:g} unet {a.unet:g}"
                what = f"LoRA {_shown(a.model.name)}{strength}"
            elif a.kind == "refiner":
                what = f"refiner {_shown(a.model.name)} ({a.model.short_hash}) switching at {a.switch:g}"
            else:
                what = f"embedding {_shown(a.model.name)}"
            seen.setdefault((a.kind, a.model.sha256, a.te, a.unet), f"{what} ({a.model.license or 'licence unknown'})")
    return "".join(f", {text}" for text in seen.values())


@app.command()
def plan(
    brief: Annotated[Path, typer.Argument(help="Brief spreadsheet (.csv or .xlsx).")],
    strict: Annotated[bool, typer.Option(help="Reject the whole brief on any problem.")] = False,
    model: ModelOpt = None,
    refiner: RefinerOpt = None,
    refiner_switch: RefinerSwitchOpt = None,
    db: DbOpt = None,
    details: Annotated[bool, typer.Option("--details", help="List every variant (prompt, seed, size, key).")] = False,
    fast: FastOpt = None,
    blocklist: BlocklistOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show what a run would make (rows x channels x prompt variations x seeds) without rendering anything."""
    settings = load_settings(config, model=model, db_url=db, refiner=refiner, refiner_switch=refiner_switch, fast=fast,
                             blocklist=blocklist)
    from flows.brief import BriefError, BriefLimits, read_brief
    from flows.campaign import make_plan
    from flows.channels import load_channels
    try:
        tdir = Path(settings.templates_dir) if settings.templates_dir else None
        parsed = read_brief(brief, known_channels=set(load_channels(tdir / "channels.yaml" if tdir else None)), strict=strict,
                            limits=BriefLimits.from_settings(settings), blocklist=settings.blocklist)
        the_plan = make_plan(parsed, settings, _existing_database(settings.db_url), strict)
    except BriefError as exc:
        raise rejected("brief", exc.problems) from None
    out = Console(highlight=False)
    groups: dict[tuple, list] = {}
    for v in the_plan.variants:
        groups.setdefault((v.row.campaign, v.row.row_id, v.channel.name), []).append(v)
    # One line per row and channel, not a table: it stays readable (and greppable) in an 80-column terminal.
    for (campaign, row_id, channel), vs in groups.items():
        v0 = vs[0]
        seeds = sorted({v.spec.seed for v in vs})
        seed_text = f"seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
        out.print(
            f"{_shown(campaign)} / {_shown(row_id)} / {_shown(channel)}: {len(vs)} image(s), template {_shown(v0.prompt.template_name)}, "
            f"{len({v.prompt.prompt for v in vs})} prompt variation(s), {seed_text}, generate {v0.spec.gen_width}x{v0.spec.gen_height} "
            f"-> deliver {v0.channel.width}x{v0.channel.height} {v0.channel.format}, model {_shown(v0.model.name)} "
            f"({v0.model.short_hash}, licence {v0.model.license or 'unknown'})" + _adapters_text(vs) + _inputs_text(v0)
            + (f", fast {v0.spec.fast}" if v0.spec.fast else ""),
            soft_wrap=True,
        )
    if details:
        for v in the_plan.variants:
            out.print(f"{_shown(v.storage_key)}\tseed {v.spec.seed}\t{_shown(v.prompt.prompt)}", soft_wrap=True)
    rows = len({(v.row.campaign, v.row.row_id) for v in the_plan.variants})
    out.print(f"{len(the_plan.variants)} images from {rows} row(s) x {len(groups)} row-channel(s); "
              f"{settings.steps} steps of {settings.sampler}, CFG {settings.cfg_scale:g}"
              + (f", fast {settings.fast} where no channel or row says otherwise" if settings.fast else ""))
    if settings.blocklist == "":
        out.print("content filter: off (blocklist setting); only the brief's own blocked_terms are checked")
    print_problems(the_plan.problems, "rows that would be skipped")
    print_problems(parsed.warnings, "warnings")


def _inputs_text(v) -> str:
    """The row's packshot, layout and brand overlay, as a plan line's tail."""
    from storage.variants import parse_inputs, parse_overlay

    inputs = parse_inputs(v.spec.inputs)
    parts = []
    if (p := inputs.product) is not None:
        parts.append(f"product {_shown(p.file)} ({p.image[:10]}) at {p.placement}")
    if (c := inputs.control) is not None:
        parts.append(f"{c.type} layout {_shown(c.file)} ({c.image[:10]}) via ControlNet {_shown(c.model_name)} "
                     f"weight {c.strength:g}")
    if (o := parse_overlay(v.spec.overlay)) is not None:
        texts = "; ".join(f"{k} {_shown(t)!r}" for k, t in (("headline", o.headline), ("body", o.body), ("cta", o.cta)) if t)
        parts.append(f"brand {_shown(o.brand)} ({o.kit[:10]}, layout {o.layout}" + (f": {texts})" if texts else ")"))
    return "".join(", " + part for part in parts)


@app.command()
def runs(
    db: DbOpt = None,
    limit: Annotated[int, typer.Option(min=1)] = 20,
    config: ConfigOpt = None,
    stats: Annotated[bool, typer.Option("--stats", help="A table of each run's figures (throughput, failures, latency, "
                                        "queue wait, device-hours, cost per image) and each campaign's totals.")] = False,
) -> None:
    """List recent runs: status, counts, timings."""
    settings = load_settings(config, db_url=db)
    from sqlalchemy import select

    from storage.database import open_database
    from storage.schema import Run

    database = open_database(settings.db_url)
    out = Console(highlight=False)
    if stats:
        from cli.run_stats import print_run_stats

        return print_run_stats(out, database, limit=limit, price=settings.price_per_device_hour)
    with database.session() as s:
        for r in s.scalars(select(Run).order_by(Run.id.desc()).limit(limit)):
            c = r.counts or {}
            counts = ", ".join(f"{k} {c[k]}" for k in ("planned", "rendered", "skipped", "failed") if k in c)
            seconds = (r.timings or {}).get("total")
            took = f" in {seconds:.1f} s" if seconds is not None else ""
            out.print(f"run {r.id}  {r.status:<23} {r.started_at:%Y-%m-%d %H:%M:%S}  {_shown(r.brief_path)}"
                      f"{'  ' + counts if counts else ''}{took}", soft_wrap=True)


@app.command()
def assets(
    run_id: Annotated[int | None, typer.Option("--run", help="Only assets written by this run.")] = None,
    campaign: Annotated[str | None, typer.Option(help="Only this campaign.")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List stored assets: key, size, sha256, seed, prompt."""
    settings = load_settings(config, db_url=db)
    from sqlalchemy import select

    from storage.database import open_database
    from storage.schema import Asset, Campaign, PromptRecord, Variant
    from storage.variants import with_joins

    database = open_database(settings.db_url)
    query = (with_joins(select(Asset, Variant, PromptRecord.prompt, Campaign.name), asset=True, prompt=True, campaign=True)
             .order_by(Asset.id))
    if run_id is not None:
        query = query.where(Asset.run_id == run_id)
    if campaign:
        query = query.where(Campaign.name == campaign)
    out = Console()
    n = 0
    with database.session() as s:
        for a, v, prompt, camp in s.execute(query):
            n += 1
            out.print(f"{a.id}\t{a.store_url}\t{a.width}x{a.height} {a.format}\t{a.size_bytes // 1024} KiB\t"
                      f"sha256 {a.sha256[:12]}\tseed {v.seed}\t{_shown(prompt)}", soft_wrap=True, highlight=False)
    console.print(f"{n} asset(s)")
