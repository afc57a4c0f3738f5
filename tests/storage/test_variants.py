"""The one variant record (storage/variants.py): its identity is the planning rule that every stored asset was
keyed by, it maps onto the variants table and the engine request by its field metadata alone, and it survives
the round trip plan -> database -> render job / re-render copy unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from sqlalchemy import select

from engine.pipeline import GenerationRequest
from storage.database import open_database
from storage.schema import Variant
from storage.variants import VariantSpec, _setting, load_variants, with_joins

SPEC = VariantSpec(
    campaign="Spring Launch", row_key="hero-01", channel="banner", template="banner", variant_index=2,
    prompt="a red circle, (studio light:1.2)", negative_prompt="blurry", seed=656819579, model_sha256="ab" * 32,
    sampler="DPM++ 2M Karras", steps=25, cfg_scale=7.0, clip_skip=1, gen_width=704, gen_height=368, out_width=1200,
    out_height=628, out_format="jpeg", out_max_kb=300, postprocess="cover-lanczos(1200x628)",
)


def test_identity_is_the_planning_rule_every_asset_was_keyed_by() -> None:
    """Written out by hand, as planning wrote it before the record existed: the same hash, so no stored asset is
    rendered again after an upgrade."""
    fields = {"campaign": SPEC.campaign, "row_id": SPEC.row_key, "channel": SPEC.channel, "template": SPEC.template,
              "prompt": SPEC.prompt, "negative": SPEC.negative_prompt, "index": SPEC.variant_index, "seed": SPEC.seed,
              "model": SPEC.model_sha256, "sampler": SPEC.sampler, "steps": SPEC.steps, "cfg": SPEC.cfg_scale,
              "clip_skip": SPEC.clip_skip, "gen": [704, 368], "out": [1200, 628], "format": "jpeg", "max_kb": 300,
              "post": SPEC.postprocess}
    expected = hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    assert SPEC.identity == expected
    assert SPEC.storage_key.startswith("spring-launch-")
    assert SPEC.storage_key.endswith(f"/hero-01/banner/v02-s656819579-{expected[:10]}.jpg")
    assert dataclasses.replace(SPEC, seed=SPEC.seed + 1).identity != SPEC.identity


def test_a_setting_added_later_keeps_old_identities_at_its_default() -> None:
    """How a new setting is declared: one field with its metadata. At its default the identity (and so every
    existing asset's key) is unchanged; any other value makes a new asset."""

    @dataclasses.dataclass(frozen=True)
    class WithStrength(VariantSpec):
        strength: float = _setting("strength", engine="strength", default=0.0, since_default=True)

    base = WithStrength(**dataclasses.asdict(SPEC))
    assert base.identity == SPEC.identity
    assert dataclasses.replace(base, strength=0.5).identity != SPEC.identity
    assert base.engine_arguments()["strength"] == 0.0
    assert base.variant_columns()["strength"] == 0.0


def test_fields_map_onto_the_engine_request_and_the_variants_table() -> None:
    request = GenerationRequest(**SPEC.engine_arguments())
    assert (request.prompt, request.negative_prompt, request.seed, request.width, request.height, request.steps,
            request.cfg_scale, request.sampler, request.clip_skip) == (
        SPEC.prompt, SPEC.negative_prompt, SPEC.seed, 704, 368, 25, 7.0, "DPM++ 2M Karras", 1)
    columns = set(Variant.__table__.columns.keys())
    assert set(SPEC.variant_columns()) <= columns
    # What the variants row does not hold comes through the joins (prompt, model, row, campaign).
    assert set(dataclasses.asdict(SPEC)) - set(SPEC.variant_columns()) == {
        "campaign", "row_key", "template", "prompt", "negative_prompt", "model_sha256"}


def test_copy_round_trip_and_fallback_for_older_copies() -> None:
    copy = {**SPEC.as_dict(), "source_variant_id": 7, "changed": []}
    assert VariantSpec.from_dict(copy) == SPEC
    older = {k: v for k, v in copy.items() if k != "variant_index"}  # re-render requests queued before the record
    assert VariantSpec.from_dict(older, variant_index=2) == SPEC


def test_recorded_variants_load_back_as_the_spec_they_were_planned_from(tmp_path, campaign_model) -> None:
    from flows.campaign import plan_run, validate_brief
    from flows.settings import load_settings
    from storage.database import sqlite_url

    brief = tmp_path / "brief.csv"
    brief.write_text("campaign,row_id,subject,channels,variants\nc1,r1,a red circle,\"instagram_square, leaderboard\",2\n")
    settings = load_settings({"db_url": sqlite_url(tmp_path / "a.db"), "store_url": str(tmp_path / "assets"),
                              "model": str(campaign_model), "steps": 2})
    planned = plan_run.fn(validate_brief.fn(str(brief), False, None), settings, False, None)
    ids = [i for batch in planned.batches for i in batch]
    assert len(ids) == 4
    db = open_database(settings.db_url)
    try:
        with db.session() as s:
            stored = load_variants(s, ids)
            assert sorted(stored) == sorted(ids)
            for v in stored.values():
                assert v.spec.identity == v.identity and v.spec.storage_key == v.storage_key
                assert v.model.sha256 == v.spec.model_sha256 and v.status == "planned"
            # The joins helper is the one way to read them with their rows: every variant, once.
            rows = s.execute(with_joins(select(Variant.id), prompt=True, model=True, campaign=True)).all()
            assert sorted(r[0] for r in rows) == sorted(ids)
    finally:
        db.dispose()


def test_the_fast_mode_is_a_setting_added_later() -> None:
    """Exact (fast "") keeps every identity planned before fast modes existed; a fast mode is another asset. It
    becomes the request's fast mode and the ``variants.fast`` column, and survives a re-render copy."""
    assert SPEC.fast == ""  # built without it: its identity is the hand-written one above
    assert dataclasses.replace(SPEC, fast="").identity == SPEC.identity
    fast = dataclasses.replace(SPEC, fast="cache:3")
    assert fast.identity != SPEC.identity
    assert dataclasses.replace(SPEC, fast="cache:3,tome:0.5").identity not in (fast.identity, SPEC.identity)
    assert fast.storage_key != SPEC.storage_key
    request = GenerationRequest(**fast.engine_arguments())
    assert str(request.fast) == "cache:3" and not GenerationRequest(**SPEC.engine_arguments()).fast.enabled
    assert fast.variant_columns()["fast"] == "cache:3"
    assert VariantSpec.from_dict({**fast.as_dict(), "changed": []}) == fast
    older = {k: v for k, v in fast.as_dict().items() if k != "fast"}  # a re-render copy queued before the field
    assert VariantSpec.from_dict(older).fast == ""
