"""The files bench/gpu_suite.py writes: ``gpu_suite.json`` (strict JSON: inf / nan as strings) and ``gpu_suite.md``
(the run's facts, then one markdown table per section)."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["TITLES", "jsonable", "markdown", "write_report"]

TITLES = {
    "sd15": "a. SD 1.5: ours vs diffusers, eager and compiled",
    "sdxl": "b. SDXL U-Net: ours vs diffusers",
    "fast": "c. Fast modes (ours)",
    "campaign": "d. Campaign through the device workers vs the engine alone",
}


def jsonable(value):
    """``value`` with every non-finite float as the string "inf", "-inf" or "nan" (strict JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = jsonable(report)
    js, md = out / "gpu_suite.json", out / "gpu_suite.md"
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    tmp.replace(js)
    md.write_text(markdown(data))
    return js, md


# ------------------------------------------------------------------------------------------------ markdown


def _f(value, spec: str = ".3g", scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value * scale, spec)


def _cell(row: dict | None, key: str, spec: str = ".3g", scale: float = 1.0) -> str:
    if row is None:
        return "-"
    if "skipped" in row:
        return "skipped"
    if "error" in row:
        return "error"
    return _f(row.get(key), spec, scale)


def _ratio(a: dict | None, b: dict | None, key: str, invert: bool = False) -> str:
    try:
        x, y = float(a[key]), float(b[key])  # type: ignore[index]
        return f"{(y / x if invert else x / y):.2f}x"
    except (TypeError, KeyError, ValueError, ZeroDivisionError):
        return "-"


def _agreement(a: dict | None) -> str:
    if not a:
        return "-"
    return f"{_f(a.get('max_abs_latent_diff'))} ({_f(a.get('relative'), '.1e')})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _sd15(sec: dict) -> list[str]:
    by = {(r["side"], r["mode"], r["batch"]): r for r in sec.get("rows", [])}
    agree = {(a["mode"], a["batch"]): a for a in sec.get("agreement", [])}
    keys = list(dict.fromkeys((r["mode"], r["batch"]) for r in sec.get("rows", [])))
    rows = []
    for mode, batch in keys:
        o, d = by.get(("ours", mode, batch)), by.get(("diffusers", mode, batch))
        rows.append([mode, str(batch), _cell(o, "images_per_s"), _cell(d, "images_per_s"),
                     _ratio(o, d, "images_per_s"), _cell(o, "s_per_step", ".2f", 1e3), _cell(d, "s_per_step", ".2f", 1e3),
                     _agreement(agree.get((mode, batch))), f"{_cell(o, 'warmup_s', '.1f')} / {_cell(d, 'warmup_s', '.1f')}"])
    head = [f"{sec.get('size', '?')}px, {sec.get('steps', '?')} steps, {sec.get('dtype', '?')}; "
            f"load s: ours {_f(sec.get('ours_load_s'), '.1f')}, diffusers {_f(sec.get('diffusers_load_s'), '.1f')}", ""]
    return head + _table(["mode", "batch", "ours images/s", "diffusers images/s", "ours / diffusers", "ours ms/step",
                          "diffusers ms/step", "max abs latent diff (relative)", "warm-up s ours / diffusers"], rows)


def _sdxl(sec: dict) -> list[str]:
    by = {(r["side"], r["mode"]): r for r in sec.get("rows", [])}
    agree = {a["mode"]: a for a in sec.get("agreement", [])}
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in sec.get("rows", [])):
        o, d = by.get(("ours", mode)), by.get(("diffusers", mode))
        rows.append([mode, _cell(o, "s_per_step", ".2f", 1e3), _cell(d, "s_per_step", ".2f", 1e3),
                     _ratio(o, d, "s_per_step", invert=True), _agreement(agree.get(mode)),
                     f"{_cell(o, 'warmup_s', '.1f')} / {_cell(d, 'warmup_s', '.1f')}"])
    head = [f"{sec.get('preset', '?')} U-Net, {sec.get('size', '?')}px, {sec.get('steps', '?')} timed Euler steps, "
            f"CFG pair, {sec.get('dtype', '?')}; load s: ours {_f(sec.get('ours_load_s'), '.1f')}, "
            f"diffusers {_f(sec.get('diffusers_load_s'), '.1f')}", ""]
    return head + _table(["mode", "ours ms/step", "diffusers ms/step", "ours speed / diffusers",
                          "max abs latent diff (relative)", "warm-up s ours / diffusers"], rows)


def _fast(sec: dict) -> list[str]:
    rows = [[r["fast"], _cell(r, "images_per_s"), _cell(r, "speedup", ".2f"), _cell(r, "psnr_mean_db", ".2f"),
             _cell(r, "psnr_min_db", ".2f"), _cell(r, "warmup_s", ".1f")] for r in sec.get("rows", [])]
    head = [f"batch {sec.get('batch', '?')}, {sec.get('size', '?')}px, {sec.get('steps', '?')} steps, "
            f"{sec.get('dtype', '?')}; PSNR of the decoded images against the off run's, same seeds", ""]
    return head + _table(["fast", "images/s", "speed-up vs off", "PSNR mean dB", "PSNR min dB", "warm-up s"], rows)


def _campaign(sec: dict) -> list[str]:
    if "e2e_images_per_s" not in sec:
        return []
    stages = sec.get("stage_s", {})
    row = [str(sec.get("variants")), str(sec.get("batch")), ", ".join(sec.get("workers", [])),
           _f(sec.get("e2e_images_per_s")), _f(sec.get("engine_images_per_s")),
           _f(sec.get("share"), ".1%") if "share" in sec else "-", f">= {_f(sec.get('target_share'), '.0%')}",
           _f(sec.get("plan_s"), ".1f"), _f(sec.get("start_and_warm_s"), ".1f"),
           " / ".join(_f(stages.get(k), ".2f") for k in ("engine", "postprocess", "store", "record"))]
    return _table(["variants", "batch", "workers", "end-to-end images/s", "engine alone images/s", "share", "target",
                   "plan s", "start + warm s", "engine / post / store / record s"], [row])


def markdown(report: dict) -> str:
    env = report.get("env", {})
    lines = ["# adforge GPU suite" + (" (dry run: small shapes on the CPU)" if report.get("dry_run") else ""), "",
             f"- device: {env.get('device_name', '?')} ({env.get('device', '?')}); torch {env.get('torch', '?')}, "
             f"diffusers {env.get('diffusers', '?')}, CUDA {env.get('cuda', '-')}, Python {env.get('python', '?')}",
             f"- load average before / after: {env.get('load_before', '?')} / {env.get('load_after', '?')}; "
             f"{env.get('cpu_count', '?')} CPU(s), {env.get('torch_threads', '?')} torch thread(s); "
             f"torch.compile backend {env.get('compile_backend', '?')}",
             f"- time: {_f(report.get('wall_s'), '.0f')} s of a {_f(report.get('budget_s'), '.0f')} s budget"
             + (f"; INTERRUPTED: {report['interrupted']}" if report.get("interrupted") else ""), ""]
    for key, title in TITLES.items():
        sec = report.get("sections", {}).get(key)
        lines += [f"## {title}", ""]
        if sec is None:
            lines += ["not run", ""]
            continue
        lines.append(f"status {sec.get('status', '?')}: {_f(sec.get('wall_s'), '.1f')} s "
                     f"(slice {_f(sec.get('slice_s'), '.0f')} s)")
        for what, value in sec.items():
            if value and (what in ("skipped", "note") or what.endswith("error")):
                lines.append(f"{what}: {value}")
        said: dict[str, list[str]] = {}  # one line per message: a skipped pair shares one
        for r in sec.get("rows", []):
            if r.get("skipped") or r.get("error"):
                label = " ".join(f"batch {r[k]}" if k == "batch" else str(r[k])
                                 for k in ("side", "mode", "batch", "fast") if k in r)
                message = f"error: {r['error']}" if r.get("error") else f"skipped: {r['skipped']}"
                said.setdefault(message, []).append(label)
        lines += [f"- {', '.join(labels)}: {message}" for message, labels in said.items()]
        lines.append("")
        body = {"sd15": _sd15, "sdxl": _sdxl, "fast": _fast, "campaign": _campaign}[key](sec)
        if body and not (sec.get("skipped") and not sec.get("rows")):
            lines += body + [""]
    return "\n".join(lines)
