"""``adforge gallery``, ``export``, ``release``, ``results import``, ``audit export``: the review side of the command.

The work is done in ``review/`` (the gallery uses the same functions); these commands resolve settings (flag >
environment > adforge.toml, as ``adforge run``), call them and report. Actions from the command line are attributed
to ``cli:<login name>`` in the audit log.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cli.errors import console, fail, rejected
from cli.options import CampaignOpt, ConfigOpt, ReviewDbOpt, StoreOpt, actor, load_settings, open_db

__all__ = ["app", "audit_app", "audit_export_command", "export_command", "gallery", "known_samplers", "release_command",
           "results_app", "results_import"]

app = typer.Typer()
results_app = typer.Typer(no_args_is_help=True, help="A/B results: import delivery numbers, see winners.")
audit_app = typer.Typer(no_args_is_help=True, help="The audit trail of a campaign's assets.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def known_samplers() -> dict[str, str]:
    """The sampler names the gallery accepts for a re-render (spelling -> display name), from the engine's
    registry: each display name and its snake_case / ``k_`` spellings, kept only where the engine accepts them."""
    from engine.sampler_names import SAMPLERS, get_sampler  # names only: the gallery does not load torch

    spellings = [*SAMPLERS, "euler_ancestral", "k_euler_ancestral"]
    for name in SAMPLERS:
        snake = re.sub(r"[\s-]+", "_", name.lower().replace("++", "pp"))  # "DPM++ 2M Karras" -> "dpmpp_2m_karras"
        spellings += [snake, f"k_{snake}"]
    known: dict[str, str] = {}
    for spelling in spellings:
        try:
            known[spelling] = get_sampler(spelling).name
        except ValueError:
            continue
    return known


def _config_file(config: Path | None) -> Path | None:
    """The adforge.toml in use (given, ADFORGE_CONFIG, or ./adforge.toml when it exists), absolute: the gallery's
    run workers get it, whatever folder they start in."""
    path = config or (Path(os.environ["ADFORGE_CONFIG"]) if os.environ.get("ADFORGE_CONFIG") else Path("adforge.toml"))
    return path.resolve() if path.is_file() else None


def _gallery_config(config: Path | None, access_log: Path | None):
    """The gallery's limits: the ``[gallery]`` table of the config file (beside ``[adforge]``), then the flags."""
    import tomllib

    from review.config import ConfigError, GalleryConfig

    path = config or (Path(os.environ["ADFORGE_CONFIG"]) if os.environ.get("ADFORGE_CONFIG") else Path("adforge.toml"))
    table: dict = {}
    if path.is_file():
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8")).get("gallery", {})
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise fail(f"{path}: {exc}", 2) from None
        if not isinstance(table, dict):
            raise fail(f"{path}: 'gallery' must be a table ([gallery])", 2)
    if access_log is not None:
        table = {**table, "access_log": str(access_log)}
    if os.environ.get("ADFORGE_METRICS_TOKEN"):
        table = {**table, "metrics_token": os.environ["ADFORGE_METRICS_TOKEN"]}
    for key, var in (("deployment", "ADFORGE_DEPLOYMENT"), ("webhook_secret", "ADFORGE_WEBHOOK_SECRET")):
        if os.environ.get(var):  # runs from the web / API (review.submissions); the secret stays out of the file
            table = {**table, key: os.environ[var]}
    log = table.get("access_log")
    if isinstance(log, str) and not Path(log).resolve().parent.is_dir():
        raise fail(f"access log {log}: its folder does not exist", 2)
    try:
        return GalleryConfig.from_mapping(table, f"{path} [gallery]")
    except ConfigError as exc:
        raise fail(exc, 2) from None


def _write_atomic_from(handle, target: Path) -> None:
    """Move a finished temporary file into place (same folder, so the rename is atomic)."""
    handle.flush()
    os.fsync(handle.fileno())
    os.replace(handle.name, target)


@app.command()
def gallery(
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8765,
    db: ReviewDbOpt = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    approvals_needed: Annotated[int, typer.Option(min=1, help="Default approved variants per row and channel for 'ready'.")] = 2,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="Default confidence an A/B winner needs.")] = 0.95,
    s3_delivery: Annotated[str, typer.Option(help="S3 files: 'presign' (short-lived URLs) or 'proxy' (through the gallery).")] = "presign",
    cache_dir: Annotated[Path | None, typer.Option(help="Thumbnail cache (default ~/.cache/adforge/thumbs).")] = None,
    secure_cookies: Annotated[bool, typer.Option(help="Mark the session cookie Secure (when served over HTTPS).")] = False,
    access_log: Annotated[Path | None, typer.Option(help="Also append the access log (one line per request) to this file.")] = None,
) -> None:
    """Serve the review gallery (sign in with a user from `adforge users add`). Limits: the [gallery] table of
    adforge.toml (see the README)."""
    settings = load_settings(config, db_url=db, store_url=store)
    if s3_delivery not in ("presign", "proxy"):
        raise fail("--s3-delivery must be 'presign' or 'proxy'", 2)
    gallery_config = _gallery_config(config, access_log)
    import logging

    import uvicorn

    from review.app import create_app
    from review.auth import list_users

    # A fixed secret keeps sessions across restarts (and across workers); without one each start makes its own.
    secret = os.environ.get("ADFORGE_GALLERY_SECRET") or None
    application = create_app(settings.db_url, settings.store_url, secret_key=secret, cache_dir=cache_dir,
                             approvals_needed=approvals_needed, confidence=confidence, s3_delivery=s3_delivery,  # type: ignore[arg-type]
                             secure_cookies=secure_cookies, config=gallery_config, samplers=known_samplers(),
                             price_per_device_hour=settings.price_per_device_hour,
                             run_config=os.fspath(_config_file(config)) if _config_file(config) else None)
    to_console = logging.StreamHandler(sys.stderr)  # uvicorn's own access log is off (log_level warning): this is it
    to_console.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("adforge.access").addHandler(to_console)
    if not list_users(application.state.db):
        console.print("[yellow]no users yet:[/yellow] add one with `adforge users add NAME --role admin`")
    if not _is_loopback(host) and not secure_cookies:
        console.print("[yellow]warning:[/yellow] listening beyond this machine over plain HTTP; put it behind HTTPS "
                      "and pass --secure-cookies")
    console.print(f"gallery on http://{host}:{port}/  (database {escape(repr(application.state.db))}, assets "
                  f"{escape(settings.store_url)})", soft_wrap=True)
    try:
        uvicorn.run(application, host=host, port=port, log_level="warning")
    finally:
        logging.getLogger("adforge.access").removeHandler(to_console)


@app.command("export")
def export_command(
    campaign: CampaignOpt,
    approved: Annotated[bool, typer.Option("--approved", help="Only approved variants (default: every stored one).")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Zip to write (default: <campaign>-<approved|all>.zip).")] = None,
    name: Annotated[list[str] | None, typer.Option("--name", help="CHANNEL=PATTERN file name pattern, e.g. "
                                                    "banner={campaign}_{row}_{width}x{height}_{label}.{ext}")] = None,
    db: ReviewDbOpt = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write a zip of a campaign's final files, named by channel convention, with manifest.csv."""
    from review.export import ExportError, check_pattern, export_campaign
    from storage.assets import open_store

    naming: dict[str, str] = {}
    for item in name or []:
        channel, sep, pattern = item.partition("=")
        if not sep or not channel or not pattern:
            raise fail(f"--name {item[:80]!r}: expected CHANNEL=PATTERN", 2)
        try:
            naming[channel.strip()] = check_pattern(pattern)
        except ExportError as exc:
            raise fail(f"--name {channel.strip()[:40]}: {exc}", 2) from None
    settings = load_settings(config, db_url=db, store_url=store)
    target = out or Path(f"{''.join(ch if ch.isalnum() or ch in '-_.' else '-' for ch in campaign)}-"
                         f"{'approved' if approved else 'all'}.zip")
    target.parent.mkdir(parents=True, exist_ok=True)
    database = open_db(settings.db_url)
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False)
    try:
        result = export_campaign(database, open_store(settings.store_url), campaign, handle, approved_only=approved,
                                 actor=actor(), naming=naming)
        _write_atomic_from(handle, target)
    except ExportError as exc:
        raise fail(exc) from None
    finally:
        handle.close()
        Path(handle.name).unlink(missing_ok=True)
        database.dispose()
    console.print(f"export {result.export_id}: {len(result.files)} file(s) + manifest.csv -> {escape(str(target))} "
                  f"(sha256 {result.zip_sha256[:16]}…)", soft_wrap=True)
    if result.withheld:
        console.print(f"left out: {len(result.withheld)} flagged asset(s) awaiting an admin's release "
                      f"({', '.join(map(str, result.withheld))}; adforge release ASSET_ID)", soft_wrap=True)


@app.command("release")
def release_command(
    asset_id: Annotated[int, typer.Argument(min=1, help="The flagged asset's id (adforge assets, the gallery).")],
    by: Annotated[str, typer.Option("--by", help="The gallery admin (adforge users list) releasing it; kept on the "
                                    "asset and in the audit log.")],
    db: ReviewDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Release an asset the image filter flagged (audited): from then on it is served and exported."""
    from review.auth import AuthError, find_user, has_role
    from storage.releases import ReleaseError, release_asset

    by = by.strip()
    settings = load_settings(config, db_url=db)
    database = open_db(settings.db_url)
    try:
        with database.session() as s:  # the same rule as the gallery's button: an enabled admin releases
            try:
                user = find_user(s, by)
            except AuthError as exc:
                raise fail(f"--by: {exc} (adforge users list)", 2) from None
            if user.disabled or not has_role(user.role, "admin"):
                raise fail(f"--by: {by!r} is {'disabled' if user.disabled else 'a ' + user.role}; an enabled admin "
                           "releases assets", 2)
        done = release_asset(database, asset_id, actor=f"{actor()} as {by}", released_by=by)
    except ReleaseError as exc:
        raise fail(exc, 2) from None
    finally:
        database.dispose()
    console.print(f"asset {asset_id}: " + (f"released by {escape(done.released_by)} at {done.released_at}" if done.changed
                                           else f"already released by {escape(done.released_by)} at {done.released_at}"))


@results_app.command("import")
def results_import(
    file: Annotated[Path, typer.Argument(help="CSV: asset_id or file_name, impressions, clicks, conversions.")],
    campaign: Annotated[str | None, typer.Option("--campaign", "-c", help="Only assets of this campaign.")] = None,
    metric: Annotated[str, typer.Option(help="ctr (clicks/impressions) or conversion (conversions/impressions).")] = "ctr",
    confidence: Annotated[float | None, typer.Option(min=0.5, max=0.999, help="Override the campaign's confidence.")] = None,
    db: ReviewDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Import results (all or nothing) and print each A/B test's winner, if any."""
    from review.export import find_campaign
    from review.queries import ReviewConfig, review_config
    from review.results import METRICS, ResultsError, ab_tests, import_results
    from storage.schema import Campaign

    if metric not in METRICS:
        raise fail(f"--metric must be one of {', '.join(METRICS)}", 2)
    settings = load_settings(config, db_url=db)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise fail(f"{file}: {exc.strerror or exc}", 2) from None
    database = open_db(settings.db_url)
    try:
        campaign_id = None
        if campaign is not None:
            with database.session() as s:
                found = find_campaign(s, campaign)
                if found is None:
                    raise fail(f"no campaign {campaign!r}", 2)
                campaign_id = found.id
        try:
            summary = import_results(database, data, file.name, actor=actor(), campaign_id=campaign_id)
        except ResultsError as exc:
            raise rejected("results", exc.problems, "nothing was imported") from None
        console.print(f"imported results for {summary.rows} asset(s), {summary.changed} changed")
        with database.session() as s:
            for cid in summary.campaign_ids:
                conf = confidence or review_config(s, cid, ReviewConfig()).confidence
                name = s.get(Campaign, cid).name
                for t in ab_tests(s, cid, confidence=conf, metric=metric):
                    v = t.verdict
                    head = f"group {v.winner} wins" if v.winner else "no winner"
                    extra = f", p = {v.p_value:.4g}" if v.p_value is not None else ""
                    extra += f", lift {v.lift:+.1%} ({v.leader} vs {v.runner_up})" if v.lift is not None else ""
                    typer.echo(f"{name} / {t.row_key} / {t.channel}: {head} ({v.reason}{extra})")
    finally:
        database.dispose()


@audit_app.command("export")
def audit_export_command(
    campaign: CampaignOpt,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Path without extension: writes OUT.csv and OUT.json "
                                             "(default: audit-<campaign>).")] = None,
    db: ReviewDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write CSV and JSON with, per asset, everything needed to reproduce it and every decision made about it."""
    from review.audit_export import AuditExportError, audit_export, to_csv, to_json
    from storage.image_metadata import write_atomic

    settings = load_settings(config, db_url=db)
    database = open_db(settings.db_url)
    try:
        export = audit_export(database, campaign)
    except AuditExportError as exc:
        raise fail(exc, 2) from None
    finally:
        database.dispose()
    base = out or Path("audit-" + "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in campaign))
    csv_path, json_path = base.with_name(base.name + ".csv"), base.with_name(base.name + ".json")
    write_atomic(csv_path, to_csv(export).encode("utf-8"))
    write_atomic(json_path, to_json(export).encode("utf-8"))
    decisions = sum(len(a["decisions"]) for a in export.assets)
    console.print(f"{len(export.assets)} asset(s), {decisions} decision(s) -> {escape(str(csv_path))}, "
                  f"{escape(str(json_path))}", soft_wrap=True)
