"""The inbox: render every new brief that lands in a folder or under an S3 prefix (``campaign-inbox`` in prefect.yaml).

A brief is *new* when no run of a brief with the same content (sha256, as the ``briefs`` table keys it) has
completed. So a renamed, copied or re-uploaded brief renders nothing twice, while an edited brief (new content) is
run; its unchanged rows then cost nothing, since the campaign run skips variants that exist. A rejected brief writes
nothing, so it is reported again on every pass until someone fixes it, which is what an inbox owner wants to see.

Each new brief runs :func:`flows.campaign.campaign_run` as a subflow; one brief's failure never stops the others.

Whatever lands in the inbox is read under the brief limits (the ``brief_max_*`` settings, :mod:`flows.brief_limits`):
a file over ``brief_max_bytes`` is rejected from its size (an S3 object's from its Content-Length, before its body
is read), and reading never takes more than the cap; the other caps are checked by reading the brief with them
before a run starts, so a rejected brief costs a bounded read and writes nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from sqlalchemy import select

from flows.brief import BriefError, BriefLimits, read_brief
from flows.brief_limits import too_big
from flows.campaign import campaign_run, open_resources
from flows.safe_text import visible
from flows.settings import load_settings
from storage.assets import LocalAssetStore, S3AssetStore, open_store
from storage.database import Database
from storage.schema import Brief as BriefRecord
from storage.schema import Run

__all__ = ["BriefResult", "InboxEntry", "inbox_run", "list_inbox"]

BRIEF_SUFFIXES = (".csv", ".xlsx")
# "." = hidden files and editors' / uploaders' temporary files; "~$" = the lock file Excel puts next to an open workbook.
IGNORED_PREFIXES = (".", "~$")
COMPLETED = ("completed", "completed_with_failures")

Status = Literal["rendered", "skipped", "rejected", "failed"]


@dataclass
class BriefResult:
    brief: str  # where it was found: a local path or an s3:// URL (never the temporary download)
    status: Status
    sha256: str | None = None
    run_id: int | None = None  # the run that rendered it (rendered), or the completed run that made it skip (skipped)
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # the campaign run's counts (rendered only)


@dataclass(frozen=True)
class InboxEntry:
    name: str  # local path or s3:// URL, for reports
    file_name: str  # the brief's own file name
    key: str | None = None  # S3 only: the key under the inbox prefix


def _is_brief(file_name: str) -> bool:
    return file_name.lower().endswith(BRIEF_SUFFIXES) and not file_name.startswith(IGNORED_PREFIXES)


def list_inbox(inbox: str) -> tuple[LocalAssetStore | S3AssetStore, list[InboxEntry]]:
    """The briefs directly in ``inbox`` (a folder, ``file://`` or ``s3://bucket/prefix[?endpoint_url=...]``), by name.

    Sub-folders are not entered: they are where people keep processed or draft briefs."""
    store = open_store(inbox)
    if isinstance(store, LocalAssetStore):
        if not store.root.is_dir():
            # A typo in the inbox path must fail the scheduled run visibly, not report "nothing new" forever.
            raise FileNotFoundError(f"inbox folder {store.root} does not exist")
        return store, [InboxEntry(str(p), p.name) for p in sorted(store.root.iterdir()) if p.is_file() and _is_brief(p.name)]
    assert isinstance(store, S3AssetStore)
    base = f"s3://{store.bucket}/{store.prefix + '/' if store.prefix else ''}"
    return store, [InboxEntry(base + key, key, key) for key in store.list() if "/" not in key and _is_brief(key)]


class _TooBig(Exception):
    def __init__(self, size: int):
        self.size = size


def _read_entry(store: LocalAssetStore | S3AssetStore, entry: InboxEntry, max_bytes: int) -> bytes:
    """The brief's bytes, at most ``max_bytes``: _TooBig (with the size, as far as it was read) past that."""
    if entry.key is None:
        with open(entry.name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise _TooBig(size)
            data = f.read(max_bytes + 1)
    else:
        assert isinstance(store, S3AssetStore)
        # S3AssetStore.get reads a body whole; here it is read up to the cap.
        response = store.client.get_object(Bucket=store.bucket, Key=store._full(entry.key))
        size = response.get("ContentLength") or 0
        with response["Body"] as body:
            if size > max_bytes:
                raise _TooBig(size)
            data = body.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _TooBig(len(data))
    return data


def _completed_run(db: Database, sha256: str) -> int | None:
    with db.session() as s:
        return s.scalar(
            select(Run.id).join(BriefRecord, Run.brief_id == BriefRecord.id)
            .where(BriefRecord.sha256 == sha256, Run.status.in_(COMPLETED)).order_by(Run.id.desc()).limit(1)
        )


@flow(name="campaign-inbox", log_prints=False, validate_parameters=True)
def inbox_run(inbox: str, strict: bool = False, overrides: dict | None = None, config: str | None = None) -> dict:
    """Run every new brief in ``inbox``; returns ``{"inbox", "counts", "briefs": [BriefResult as dict, ...]}``."""
    log = get_run_logger()
    # Settings are resolved once up front: a broken configuration fails the inbox run, not every brief in it.
    settings = load_settings(overrides or {}, config=config)
    limits = BriefLimits.from_settings(settings)
    db, _ = open_resources(settings)
    store, entries = list_inbox(inbox)
    results: list[BriefResult] = []
    seen: dict[str, BriefResult] = {}  # sha256 -> the result of the first brief with that content in this pass
    with tempfile.TemporaryDirectory(prefix="adforge-inbox-") as tmp:
        for entry in entries:
            try:
                data = _read_entry(store, entry, limits.max_bytes)
                if entry.key is None:
                    path = Path(entry.name)
                else:
                    # The brief reader names the file in every problem: keep the original name, not a random one.
                    path = Path(tmp) / entry.file_name
                    path.write_bytes(data)
            except _TooBig as exc:
                results.append(BriefResult(entry.name, "rejected", problems=[str(too_big(entry.name, exc.size, limits))]))
                log.info("%s: rejected\n  %s", visible(entry.name), results[-1].problems[0])
                continue
            except Exception as exc:  # vanished between listing and reading, unreadable, S3 error, odd key
                results.append(BriefResult(entry.name, "failed", problems=[f"{entry.name}: cannot read: {exc}"]))
                continue
            sha256 = hashlib.sha256(data).hexdigest()
            if (first := seen.get(sha256)) is not None:
                result = BriefResult(entry.name, "skipped", sha256, run_id=first.run_id,
                                     problems=[f"{entry.name}: same content as {first.brief}"])
            else:
                result = seen[sha256] = _run_brief(entry.name, path, sha256, db, strict, overrides, config, limits,
                                                   inputs_from=inbox if entry.key is not None else None)
            log.info("%s: %s%s", visible(entry.name), result.status, "".join("\n  " + p for p in result.problems))
            results.append(result)
    counts = Counter(r.status for r in results)
    log.info("inbox %s: %s", inbox, ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no briefs")
    return {"inbox": inbox, "counts": dict(counts), "briefs": [asdict(r) for r in results]}


def _run_brief(name: str, path: Path, sha256: str, db: Database, strict: bool, overrides: dict | None,
               config: str | None, limits: BriefLimits, inputs_from: str | None = None) -> BriefResult:
    """Run one brief unless a brief with its content has completed; ``name`` is what reports call it; its image
    paths are read from ``inputs_from`` (the S3 inbox), else beside the brief."""
    if (done := _completed_run(db, sha256)) is not None:
        return BriefResult(name, "skipped", sha256, run_id=done)

    local = os.fspath(path)

    def named(problems: list[str]) -> list[str]:
        # Problems name the file the reader read; for an S3 brief that is the temporary copy: name the S3 URL.
        return [p.replace(local, name) for p in problems]

    try:
        # The configured caps, before a run starts (the run reads the brief again, for its own validation).
        warnings = [f"warning: {w}" for w in read_brief(local, limits=limits).warnings]
    except BriefError as exc:
        return BriefResult(name, "rejected", sha256, problems=named([str(p) for p in exc.problems]))
    try:
        summary = campaign_run(local, strict=strict, overrides=overrides, config=config,
                               source=name if name != local else None, inputs_from=inputs_from)
    except BriefError as exc:
        return BriefResult(name, "rejected", sha256, problems=named([str(p) for p in exc.problems]))
    except Exception as exc:  # model missing, database down, ...: this brief failed, the next one may not
        return BriefResult(name, "failed", sha256, problems=named([f"{name}: {type(exc).__name__}: {exc}"]))
    return BriefResult(name, "rendered", sha256, run_id=summary["run_id"], problems=named(summary["problems"] + warnings),
                       counts=summary["counts"])
