"""Retrying storage and database calls on transient errors (network blips, throttling, a locked SQLite file)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

__all__ = ["is_permanent", "is_transient", "retry_call"]

log = logging.getLogger(__name__)
T = TypeVar("T")


# SQLite result codes that waiting does not cure: the disk (or max_page_count) is full, the file is damaged or is
# not a database, the file is read-only. PostgreSQL's "disk full" (SQLSTATE 53100) is the same kind.
_PERMANENT_SQLITE = {"SQLITE_FULL", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_READONLY"}
_PERMANENT_SQLSTATE = {"53100"}


def is_permanent(exc: BaseException) -> bool:
    """A database error that a retry cannot fix (full disk, corrupt file): report it at once instead."""
    orig = getattr(exc, "orig", exc)
    name = getattr(orig, "sqlite_errorname", None)
    if name is not None:
        return "_".join(name.split("_")[:2]) in _PERMANENT_SQLITE  # SQLITE_READONLY_DBMOVED is SQLITE_READONLY
    return getattr(orig, "sqlstate", None) in _PERMANENT_SQLSTATE


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and is_permanent(exc):
        return False
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or code in {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}
    return False


def retry_call(fn: Callable[..., T], *args, attempts: int = 4, base_delay: float = 0.5, **kwargs) -> T:
    """``fn(*args, **kwargs)``, retried with jittered exponential backoff while the error is transient."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (attempt %d/%d, retrying in %.1fs): %s", getattr(fn, "__name__", fn), attempt, attempts, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")
