"""An uploaded brief checked and planned without starting anything: the same code and messages as ``adforge plan``.

The upload's own file name is never used as a path: it is reduced to a safe base name (letters, digits, ``. _ -``)
that must end in .csv or .xlsx, and the bytes are read from a private temporary folder under that name (so that
problems name the file the user uploaded). The plan is summarised per row and channel (model, licence, sizes),
with an estimate of device time and cost: the model's recent seconds per image from the database (scaled to the
planned steps and size), else a default per family (:data:`DEFAULT_SECONDS`).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select

from storage.schema import Asset, Variant

__all__ = ["DEFAULT_SECONDS", "CheckError", "OPTION_TYPES", "check_upload", "clean_options", "safe_brief_name"]

# Seconds per image at the family's native size and 25 steps on one current GPU, when the database has no
# measurement of the model yet. A guess to size a run, said as such ("basis": "default").
DEFAULT_SECONDS = {"sd1": 1.5, "sd2": 2.0, "sdxl": 5.0}
# The run options an upload may set (each as `adforge run` takes it) and their bounds.
OPTION_TYPES: dict[str, tuple[type, Any, Any]] = {
    "strict": (bool, None, None), "steps": (int, 1, 150), "sampler": (str, 1, 64), "cfg_scale": (float, 0.0, 30.0),
    "fast": (str, 0, 64),
}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class CheckError(ValueError):
    """A refusal: HTTP ``status``, machine ``code``, and the problems (each file / line / column / message)."""

    def __init__(self, status: int, code: str, message: str, problems: list[dict] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.problems = status, code, message, problems or []


def safe_brief_name(filename: str | None) -> str:
    base = re.split(r"[\\/]", filename or "")[-1]
    name = _SAFE.sub("_", base).strip("._")[:120] or "brief"
    if not name.lower().endswith((".csv", ".xlsx")):
        raise CheckError(422, "unsupported_type", f"the brief must be a .csv or .xlsx file, got {base[:80]!r}",
                         [{"file": base[:80], "line": None, "column": None,
                           "message": "not a .csv or .xlsx file", "text": f"{base[:80]}: not a .csv or .xlsx file"}])
    return name


def clean_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The whitelisted run options, coerced (form fields arrive as text); anything else is refused by name."""
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if value is None or value == "":
            continue
        if key not in OPTION_TYPES:
            raise CheckError(422, "unknown_option", f"unknown option {key!r} (known: {', '.join(OPTION_TYPES)})")
        kind, low, high = OPTION_TYPES[key]
        try:
            if kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "on", "yes")
                elif not isinstance(value, bool):
                    raise ValueError
            elif kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
                if not low <= value <= high:
                    raise ValueError
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not low <= value <= high:
                    raise ValueError
            else:
                value = str(value).strip()
                if not (low <= len(value) <= high and value.isprintable()):
                    raise ValueError
        except (TypeError, ValueError):
            bounds = "" if low is None else f" in {low} .. {high}" if kind is not str else ""
            raise CheckError(422, "invalid_option", f"option {key!r}: expected {kind.__name__}{bounds}, "
                             f"got {str(value)[:40]!r}") from None
        out[key] = value
    return out


def _problems_of(items: list, path: Path | None = None, name: str = "") -> list[dict]:
    """Problems as JSON; the server's temporary copy of the upload (``path``) is named by the upload's own name
    (``name``) in every field, so no answer shows where the server keeps files."""
    def clean(text: Any) -> Any:
        return text.replace(str(path), name).replace(str(path.parent), "") if path is not None and isinstance(text, str) else text

    out = []
    for p in items:
        if hasattr(p, "message"):
            out.append({"file": clean(str(p.file)) if p.file is not None else None, "line": p.line, "column": p.column,
                        "message": clean(p.message), "text": clean(str(p))})
        else:  # planning warnings are plain text
            out.append({"file": None, "line": None, "column": None, "message": clean(str(p)), "text": clean(str(p))})
    return out


def check_upload(data: bytes, filename: str, settings: Any, db: Any, *, strict: bool, price: float,
                 backend: str) -> dict:
    """Validate and plan ``data`` (the uploaded brief) with run ``settings``; the BriefCheck dict
    (see /tmp/issue25_interface.md). Raises :class:`CheckError` for an upload that is no brief at all."""
    from flows.brief import BriefError, BriefLimits, read_brief
    from flows.campaign import make_plan
    from flows.channels import load_channels

    name = safe_brief_name(filename)
    sha = hashlib.sha256(data).hexdigest()
    result: dict[str, Any] = {"ok": False, "file": name, "sha256": sha, "backend": backend, "problems": [],
                              "warnings": [], "plan": None}
    if not data:
        result["problems"] = [{"file": name, "line": None, "column": None, "message": "the file is empty",
                               "text": f"{name}: the file is empty"}]
        return result
    tdir = Path(settings.templates_dir) if settings.templates_dir else None
    with tempfile.TemporaryDirectory(prefix="adforge-upload-") as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            parsed = read_brief(path, known_channels=set(load_channels(tdir / "channels.yaml" if tdir else None)),
                                strict=strict, limits=BriefLimits.from_settings(settings), blocklist=settings.blocklist)
            the_plan = make_plan(parsed, settings, db, strict)
        except BriefError as exc:
            result["problems"] = _problems_of(exc.problems, path, name)
            return result
        except (UnicodeDecodeError, ValueError) as exc:  # a reader's own failure on junk bytes: still the user's file
            message = str(exc)[:300].replace(str(path), name)
            result["problems"] = [{"file": name, "line": None, "column": None, "message": message,
                                   "text": f"{name}: {message}"}]
            return result
    result["problems"] = _problems_of(the_plan.problems, path, name)
    result["warnings"] = _problems_of(list(parsed.warnings), path, name)
    if not the_plan.variants:
        result["problems"] = result["problems"] or [{"file": name, "line": None, "column": None,
                                                      "message": "the brief plans no images", "text": f"{name}: the brief plans no images"}]
        return result
    result["plan"] = summarize(the_plan, settings, db, price)
    result["ok"] = not (strict and result["problems"])
    return result


def summarize(the_plan: Any, settings: Any, db: Any, price: float) -> dict:
    groups: dict[tuple, list] = {}
    for v in the_plan.variants:
        groups.setdefault((v.row.campaign, v.row.row_id, v.channel.name), []).append(v)
    rows = {(v.row.campaign, v.row.row_id) for v in the_plan.variants}
    per_image = _seconds_per_image(the_plan.variants, db)
    device_seconds = sum(per_image[v.identity][0] for v in the_plan.variants)
    measured = all(per_image[v.identity][1] == "measured" for v in the_plan.variants)
    return {
        "images": len(the_plan.variants), "rows": len(rows), "row_channels": len(groups),
        "channels": sorted({v.channel.name for v in the_plan.variants}),
        "steps": settings.steps, "sampler": settings.sampler, "cfg_scale": settings.cfg_scale, "fast": settings.fast,
        "groups": [{"campaign": c, "row_id": r, "channel": ch, "images": len(vs),
                    "prompts": len({v.prompt.prompt for v in vs}),
                    "generate": f"{vs[0].spec.gen_width}x{vs[0].spec.gen_height}",
                    "deliver": f"{vs[0].channel.width}x{vs[0].channel.height} {vs[0].channel.format}",
                    "model": vs[0].model.name, "model_hash": vs[0].model.short_hash,
                    "licence": vs[0].model.license or "unknown"} for (c, r, ch), vs in groups.items()],
        "estimate": {"device_seconds": round(device_seconds, 2),
                     "seconds_per_image": round(device_seconds / len(the_plan.variants), 3),
                     "basis": "measured" if measured else "default",
                     "price_per_device_hour": price or None,
                     "cost": round(device_seconds / 3600 * price, 4) if price > 0 else None},
    }


def _seconds_per_image(variants: list, db: Any) -> dict[str, tuple[float, str]]:
    """identity -> (estimated seconds, "measured" | "default"). Measured: the model's last 50 images' render
    seconds per step and pixel, times this image's steps and pixels."""
    rates: dict[int, float | None] = {}
    if db is not None:
        with db.session() as s:
            for model_id in {v.model.id for v in variants if v.model.id}:
                rows = s.execute(select(Asset.render_seconds, Variant.steps, Variant.gen_width, Variant.gen_height)
                                 .join(Variant, Variant.id == Asset.variant_id)
                                 .where(Variant.model_id == model_id, Asset.render_seconds.is_not(None))
                                 .order_by(Asset.id.desc()).limit(50)).all()
                per = [sec / (steps * w * h) for sec, steps, w, h in rows if steps and w and h and sec]
                rates[model_id] = sum(per) / len(per) if per else None
    out = {}
    for v in variants:
        work = v.spec.steps * v.spec.gen_width * v.spec.gen_height
        rate = rates.get(v.model.id)
        if rate is not None:
            out[v.identity] = (rate * work, "measured")
        else:
            native = v.model.native_size or 512
            base = DEFAULT_SECONDS.get(v.model.family, DEFAULT_SECONDS["sd1"])
            out[v.identity] = (base * work / (25 * native * native), "default")
    return out
