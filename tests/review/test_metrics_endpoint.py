"""The gallery's ``GET /metrics`` and metrics page after a real campaign run (tiny model): scraped with the bearer
token and parsed with prometheus_client's own parser, its counts equal the database's; anonymous scrapes, wrong
tokens and non-admins are refused; the metrics page draws its charts as inline SVG for a signed-in viewer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from review.app import create_app
from review.config import ConfigError, GalleryConfig
from review.auth import add_user
from storage.database import open_database, sqlite_url
from storage.review_schema import ReviewState
from storage.schema import Asset, AuditEntry, BriefRowRecord, Campaign, Run, Variant
from tests.helpers import templates_with_channels, write_brief
from tests.review.world import PASSWORD, Browser

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")

TOKEN = "metrics-token-0123456789abcdef"
CHANNELS = ("  m_png:\n    width: 64\n    height: 64\n    format: png\n    max_kb: 8192\n"
            "  m_impossible:\n    width: 256\n    height: 256\n    format: png\n    max_kb: 1\n")


@dataclass
class Served:
    app: object
    db_url: str
    run_id: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, campaign_model: Path, prefect_harness: str) -> Iterator[Served]:
    from flows.campaign import campaign_run, close_resources
    from flows.rendering import clear_pipelines

    tmp = tmp_path_factory.mktemp("metrics")
    db_url = sqlite_url(tmp / "adforge.db")
    brief = write_brief(tmp / "brief.csv", [
        "scrape-a,a1,a red circle,m_png,3",
        'scrape-b,b1,a blue square,"m_png, m_impossible",2',
    ], ["campaign", "row_id", "subject", "channels", "variants"])
    summary = campaign_run(str(brief), overrides={
        "db_url": db_url, "store_url": str(tmp / "assets"), "model": str(campaign_model), "steps": 2, "batch_size": 2,
        "templates_dir": str(templates_with_channels(tmp, CHANNELS)), "price_per_device_hour": 3.0})
    close_resources()
    clear_pipelines()
    assert summary["counts"]["rendered"] == 5 and summary["counts"]["failed"] == 2
    db = open_database(db_url)
    for name, role in {"ada": "admin", "vic": "viewer"}.items():
        add_user(db, name, role, PASSWORD, actor="tests")
    with db.session() as s:  # one reviewed asset, so that the assets counter has two statuses
        first = s.scalars(select(Asset).order_by(Asset.id)).first()
        s.add(ReviewState(variant_id=first.variant_id, status="approved", updated_by="ada"))
    db.dispose()
    app = create_app(db_url, str(tmp / "assets"), secret_key="test-secret", cache_dir=tmp / "thumbs",
                     config=GalleryConfig(metrics_token=TOKEN))
    yield Served(app, db_url, summary["run_id"])
    app.state.db.dispose()


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(family, suffix: str = "") -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == family.name + suffix}


def test_scraped_counts_equal_the_database(served: Served) -> None:
    client = Browser(served.app).client
    r = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain") and "version=" in r.headers["content-type"]
    families = _families(r.text)

    db = open_database(served.db_url)
    with db.session() as s:
        assets = s.execute(select(Asset, Campaign.name, ReviewState.status).join(Variant, Asset.variant_id == Variant.id)
                           .join(BriefRowRecord, BriefRowRecord.id == Variant.row_id)
                           .join(Campaign, Campaign.id == BriefRowRecord.campaign_id)
                           .outerjoin(ReviewState, ReviewState.variant_id == Variant.id)).all()
        variants = s.execute(select(Variant.status, Campaign.name).join(BriefRowRecord, BriefRowRecord.id == Variant.row_id)
                             .join(Campaign, Campaign.id == BriefRowRecord.campaign_id)).all()
        runs = s.scalars(select(Run.status)).all()
        failures = s.scalars(select(AuditEntry.entity_id).where(AuditEntry.action == "variant.failed")).all()
        device = s.get(Run, served.run_id).timings["devices"]["cpu"]["seconds"]
    db.dispose()

    expected_assets = Counter((("campaign", name), ("status", status or "pending")) for _, name, status in assets)
    assert families["adforge_assets"].type == "gauge"  # an asset moves from pending to approved: not a counter
    assert _samples(families["adforge_assets"]) == dict(expected_assets)
    assert sum(expected_assets.values()) == 5
    expected_variants = Counter((("campaign", name), ("status", status)) for status, name in variants)
    assert _samples(families["adforge_variants"]) == dict(expected_variants)
    assert _samples(families["adforge_variants"])[(("campaign", "scrape-b"), ("status", "failed"))] == 2
    assert _samples(families["adforge_runs"]) == {(("status", k),): v for k, v in Counter(runs).items()}
    assert sum(_samples(families["adforge_variant_failures"], "_total").values()) == len(set(failures)) == 2
    flagged = Counter(name for a, name, _ in assets if a.flagged)
    assert _samples(families["adforge_assets_flagged"], "_total") == {(("campaign", k),): v for k, v in flagged.items()}

    engine = families["adforge_engine_seconds"]
    for campaign in ("scrape-a", "scrape-b"):
        seconds = [a.render_seconds for a, name, _ in assets if name == campaign]
        key = (("campaign", campaign),)
        assert _samples(engine, "_count")[key] == len(seconds)
        assert _samples(engine, "_sum")[key] == pytest.approx(sum(seconds))
        buckets = {dict(s.labels)["le"]: s.value for s in engine.samples
                   if s.name == "adforge_engine_seconds_bucket" and s.labels["campaign"] == campaign}
        assert buckets["+Inf"] == len(seconds)
        assert buckets["0.5"] == sum(1 for v in seconds if v <= 0.5)
    queue = families["adforge_queue_seconds"]
    assert sum(_samples(queue, "_count").values()) == 5
    # The run's device-seconds at 3.0 a device-hour, shared 3 : 4 by the campaigns' images (delivered + failed).
    cost = _samples(families["adforge_cost"], "_total")
    assert sum(cost.values()) == pytest.approx(device / 3600 * 3.0)
    assert cost[(("campaign", "scrape-a"),)] == pytest.approx(device / 3600 * 3.0 * 3 / 7)


def test_anonymous_wrong_token_and_non_admins_are_refused(served: Served) -> None:
    anonymous = Browser(served.app).client
    r = anonymous.get("/metrics")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "adforge_" not in r.text
    r = anonymous.get("/metrics", headers={"Authorization": "Bearer " + "x" * len(TOKEN)})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert anonymous.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    viewer = Browser(served.app, "vic")
    r = viewer.get("/metrics")
    assert r.status_code == 403 and "adforge_" not in r.text
    admin = Browser(served.app, "ada")
    r = admin.get("/metrics")
    assert r.status_code == 200 and "adforge_assets_flagged_total" in r.text


def test_a_gallery_without_a_token_accepts_none(served: Served, tmp_path: Path) -> None:
    app = create_app(served.db_url, str(tmp_path / "assets"), secret_key="s", cache_dir=tmp_path / "thumbs")
    try:
        client = Browser(app).client
        assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
    finally:
        app.state.db.dispose()
    with pytest.raises(ConfigError, match="'metrics_token' must be at least 24"):
        GalleryConfig(metrics_token="short")
    assert GalleryConfig.from_mapping({"metrics_token": TOKEN}).metrics_token == TOKEN


def test_metrics_page_draws_svg_charts_for_a_signed_in_viewer(served: Served) -> None:
    assert Browser(served.app).get("/stats").status_code == 303  # anonymous: to the sign-in page
    viewer = Browser(served.app, "vic")
    home = viewer.get("/")
    assert 'href="/stats"' in home.text  # the nav link
    db = open_database(served.db_url)
    with db.session() as s:  # a campaign name is text, never markup
        s.scalars(select(Campaign).where(Campaign.name == "scrape-b")).one().name = "<script>x</script>&b"
    try:
        r = viewer.get("/stats")
        assert r.status_code == 200, r.text
        page = r.text
        for chart in ("chart-throughput", "chart-latency", "chart-failures", "chart-cost"):
            assert f'<figure class="chart" id="{chart}">' in page
        assert page.count("<svg ") == 4 and "<polyline" in page and '<rect class="bar"' in page
        assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;&amp;b" in page
        assert f'<tr data-run-id="{served.run_id}">' in page
        row = page.split(f'<tr data-run-id="{served.run_id}">')[1].split("</tr>")[0]
        assert '<td class="delivered">5</td>' in row and '<td class="failed">2</td>' in row and "28.6 %" in row
        with db.session() as s:
            campaign_id = s.scalars(select(Campaign.id).where(Campaign.name == "scrape-a")).one()
        one = viewer.get(f"/stats?campaign={campaign_id}")
        assert one.status_code == 200 and "Runs that rendered scrape-a" in one.text
        assert viewer.get("/stats?campaign=999999").status_code == 404
    finally:
        with db.session() as s:
            s.scalars(select(Campaign).where(Campaign.name == "<script>x</script>&b")).one().name = "scrape-b"
        db.dispose()
