"""``GET /metrics`` (Prometheus, for a scraper with the bearer token or a signed-in admin) and ``GET /stats`` (the
metrics page, for any signed-in user): run and campaign figures from :mod:`storage.run_metrics`.

``/metrics`` answers a scraper, not a person: 401 with ``WWW-Authenticate: Bearer`` without credentials or with a
wrong token, 403 for a signed-in user who is not an admin; never a redirect to the sign-in page. The token is
compared in constant time; a gallery without ``metrics_token`` accepts none.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from review.charts import bar_chart, line_chart
from review.middleware import LimitedRoute
from review.prometheus import DatabaseCollector
from review.security import CurrentUser, current_user, optional_user
from storage.run_metrics import campaign_metrics, run_metrics

__all__ = ["router"]

router = APIRouter(route_class=LimitedRoute)
Viewer = Annotated[CurrentUser, Depends(current_user)]
STATS_RUNS = 30  # runs on the metrics page (newest), oldest first on its time axis


def _refuse(status: int, message: str, error: str | None = None) -> Response:
    challenge = "Bearer" + (f' error="{error}"' if error else "")
    headers = {"WWW-Authenticate": challenge} if status == 401 else {}
    return PlainTextResponse(message + "\n", status, headers=headers)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    state = request.app.state
    token = state.config.metrics_token
    sent = request.headers.get("authorization")
    if sent is not None:
        scheme, _, value = sent.partition(" ")
        ok = bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
        if not ok:
            return _refuse(401, "invalid metrics token", "invalid_token")
    else:
        user = optional_user(request)
        if user is None:
            return _refuse(401, "metrics need the gallery's metrics token (Authorization: Bearer ...) or a signed-in admin")
        if not user.is_admin:
            return _refuse(403, f"metrics need the admin role; you are signed in as {user.role}")
    body = generate_latest(DatabaseCollector(state.db, state.price_per_device_hour))  # type: ignore[arg-type]
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


@router.get("/stats")
def stats_page(request: Request, user: Viewer, campaign: int | None = None) -> Response:
    from review.pages import render

    state = request.app.state
    price = state.price_per_device_hour
    with state.db.session() as s:
        campaigns = campaign_metrics(s, price=price)
        chosen = next((c for c in campaigns if c.campaign_id == campaign), None)
        if campaign is not None and chosen is None:
            raise HTTPException(404, f"no campaign {campaign} with rendered variants")
        ids = sorted(chosen.run_ids)[-STATS_RUNS:] if chosen is not None else None
        runs = list(reversed(run_metrics(s, run_ids=ids, limit=STATS_RUNS, price=price)))  # oldest first
    labels = [f"#{r.run_id}" for r in runs]
    scope = f"campaign {chosen.name}" if chosen is not None else f"the last {len(runs)} runs"
    charts = [
        bar_chart("chart-throughput", "Images per minute, by run", "img/min", labels,
                  [r.figures.images_per_minute for r in runs], f"Delivered images per minute of wall time, {scope}."),
        line_chart("chart-latency", "Engine latency per image, by run", "s", labels,
                   [("p50", [r.figures.latency.p50 for r in runs]), ("p90", [r.figures.latency.p90 for r in runs]),
                    ("p99", [r.figures.latency.p99 for r in runs])],
                   f"Engine seconds per image, 50th, 90th and 99th percentiles, {scope}."),
        bar_chart("chart-failures", "Failed variants, by run", "failed", labels, [r.figures.failed for r in runs],
                  f"Variants each run failed, {scope}."),
        bar_chart("chart-cost", "Cost per image, by campaign", "per image", [c.name for c in campaigns],
                  [c.figures.cost_per_image for c in campaigns],
                  "Device-hours times the price per device-hour, divided by delivered images, per campaign."),
    ]
    return render(request, "stats.html", {"runs": runs, "campaigns": campaigns, "chosen": chosen, "charts": charts,
                                           "price": price})
