"""Planning: brief rows x channels x variants -> planned variants with seeds, sizes, stable identities and storage
keys, and the rows planning must skip (licence, missing model, template problems)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flows.brief import Brief, BriefError, read_brief
from flows.model_registry import ModelInfo, describe_model
from flows.planning import Plan, model_folders, plan_brief
from flows.settings import Settings, load_settings
from flows.channels import ChannelFormat, native_size_for
from flows.styles import StylePreset
from tests.helpers import write_brief

HEADER = ["campaign", "row_id", "subject", "channels", "variants", "seed", "model", "license"]
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}


# ------------------------------------------------------------------------------------------------ fixtures / helpers


class Resolver:
    """``resolve_model`` for plan_brief: describe_model on the file (no database), counting look-ups."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: str) -> ModelInfo:
        self.calls.append(path)
        return describe_model(path)


def row(row_id: str, channels: str = "instagram_square", variants: int = 2, seed: int = 1000, **more: Any) -> dict[str, Any]:
    return {"campaign": "Spring Launch", "row_id": row_id, "subject": f"running shoe {row_id}", "channels": channels,
            "variants": variants, "seed": seed, **more}


@pytest.fixture
def make_plan(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, channels: dict[str, ChannelFormat],
              styles: dict[str, StylePreset], campaign_model: Path) -> Callable[..., Plan]:
    """Write ``rows`` as a CSV brief, read it and plan it with the campaign model as default. The session's
    temporary folder (where every test model file lives) is the model folder rows may name files in."""
    counter = iter(range(1000))
    model_dirs = str(tmp_path_factory.getbasetemp())

    def make(rows: list[dict[str, Any]], *, settings: Settings | None = None, strict: bool = False,
             resolver: Resolver | None = None, header: list[str] = HEADER) -> Plan:
        path = write_brief(tmp_path / f"brief-{next(counter)}.csv", rows, header)
        brief = read_brief(path, known_channels=set(channels))
        settings = settings or load_settings({"model_dirs": model_dirs}, env={}, cwd=tmp_path)
        return plan_brief(brief, settings, channels=channels, styles=styles,
                          resolve_model=resolver or Resolver(), default_model=campaign_model, strict=strict)

    return make


def _identities(plan: Plan, row_id: str | None = None) -> list[str]:
    return [v.identity for v in plan.variants if row_id is None or v.row.row_id == row_id]


# ------------------------------------------------------------------------------------------------ expansion


def test_counts_seeds_and_sizes(make_plan: Callable[..., Plan], channels: dict[str, ChannelFormat]) -> None:
    """Rows x channels x variants images; seed row.seed + i; generation size from the model's 64 px native size."""
    plan = make_plan([row("hero", "instagram_square, story", variants=3, seed=500), row("wide", "leaderboard", variants=2, seed=7)])
    assert plan.problems == [] and plan.skipped_rows == []
    assert len(plan.variants) == 2 * 3 + 1 * 2
    groups = plan.by_row()
    assert {k: len(v) for k, v in groups.items()} == {("Spring Launch", "hero"): 6, ("Spring Launch", "wide"): 2}
    for v in plan.variants:
        assert v.spec.seed == v.row.seed + v.spec.variant_index
        assert (v.spec.gen_width, v.spec.gen_height) == native_size_for(channels[v.channel.name], 64)
        assert v.spec.postprocess == f"cover-lanczos({v.channel.width}x{v.channel.height})"
        assert v.spec.out_format == channels[v.channel.name].format
        assert v.model.native_size == 64 and v.model.license == "apache-2.0"
        assert (v.spec.sampler, v.spec.steps, v.spec.cfg_scale, v.spec.clip_skip) == ("DPM++ 2M Karras", 25, 7.0, 1)
    hero_story = [v for v in plan.variants if v.row.row_id == "hero" and v.channel.name == "story"]
    assert [(v.spec.variant_index, v.spec.seed) for v in hero_story] == [(0, 500), (1, 501), (2, 502)]
    story = hero_story[0]
    assert story.spec.gen_height > story.spec.gen_width  # portrait channel, portrait generation
    wide = [v for v in plan.variants if v.channel.name == "leaderboard"][0]
    assert wide.spec.gen_width > wide.spec.gen_height


def test_prompt_variations_cycle_over_variants(make_plan: Callable[..., Plan]) -> None:
    """Image i uses prompt variation i mod n (the default template has a two-way {a|b} group)."""
    plan = make_plan([row("hero", variants=5)])
    prompts = [v.prompt for v in plan.variants]
    assert len({p.prompt for p in prompts}) == 2
    n = len({p.variation_index for p in prompts})
    assert [p.variation_index for p in prompts] == [i % n for i in range(5)]
    assert all("running shoe hero" in p.prompt for p in prompts)


def test_seeds_stay_below_int64(make_plan: Callable[..., Plan]) -> None:
    """Seeds up to 2**63 - 1 (what torch accepts) are planned as seed + i; a row whose last image would pass it
    is refused naming its seed cell, never wrapped to 0, 1, 2 (it used to wrap silently)."""
    plan = make_plan([row("edge", variants=2, seed=2**63 - 2), row("over", variants=4, seed=2**63 - 3)])
    assert [v.spec.seed for v in plan.variants] == [2**63 - 2, 2**63 - 1]
    [problem] = plan.problems
    assert (problem.line, problem.column) == (3, "seed")
    assert "'9223372036854775805' is too large for 4 variants" in problem.message
    assert "use a seed of at most 9223372036854775804" in problem.message


def test_planning_refuses_a_seed_range_past_int64_from_any_brief(make_plan: Callable[..., Plan],
                                                                 channels: dict[str, ChannelFormat],
                                                                 campaign_model: Path) -> None:
    """A row built without read_brief's checks (seed 2**63 - 1, 4 variants) is refused by planning itself."""
    brief = make_plan([row("ok", variants=1)]).brief
    edge = replace(brief.rows[0], row_id="edge", seed=2**63 - 1, variants=4)
    plan = plan_brief(replace(brief, rows=[*brief.rows, edge]), load_settings(env={}, cwd=brief.path.parent),
                      channels=channels, styles={}, resolve_model=Resolver(), default_model=campaign_model)
    assert [v.row.row_id for v in plan.variants] == ["ok"]
    [problem] = plan.problems
    assert problem.column == "seed" and "9223372036854775807 + 4 variants passes 2**63 - 1" in problem.message


def test_batch_groups_share_model_and_generation_size(make_plan: Callable[..., Plan]) -> None:
    """Variants of the same generation size and model fall into one batch group; other sizes do not."""
    plan = make_plan([row("a", "instagram_square, leaderboard"), row("b", "instagram_square")])
    groups = {v.batch_group for v in plan.variants}
    assert len(groups) == 2
    square = {v.batch_group for v in plan.variants if v.channel.name == "instagram_square"}
    assert len(square) == 1


def test_each_model_is_resolved_once(make_plan: Callable[..., Plan], campaign_model: Path) -> None:
    """Many rows on one model cost one look-up (hashing a 4 GB file per row would be slow)."""
    resolver = Resolver()
    make_plan([row("a"), row("b"), row("c", model=str(campaign_model))], resolver=resolver)
    assert sorted(set(resolver.calls)) == [str(campaign_model)]
    assert len(resolver.calls) == 1


# ------------------------------------------------------------------------------------------------ identities and keys


def test_identities_are_unique_and_stable(make_plan: Callable[..., Plan]) -> None:
    """Every planned image has its own identity, and planning the same brief again gives the same ones."""
    rows = [row("hero", "instagram_square, story, banner", variants=3), row("wide", "leaderboard", variants=2)]
    first, second = make_plan(rows), make_plan(rows)
    ids = _identities(first)
    assert len(ids) == len(set(ids)) == 11
    assert all(len(i) == 64 and int(i, 16) >= 0 for i in ids)
    assert ids == _identities(second)
    assert [v.storage_key for v in first.variants] == [v.storage_key for v in second.variants]


def test_changing_the_prompt_changes_only_that_rows_identities(make_plan: Callable[..., Plan]) -> None:
    """Editing a row's subject gives its images new identities and keys; the other row keeps its own."""
    before = make_plan([row("hero"), row("other")])
    after = make_plan([row("hero", subject="trail shoe in the rain"), row("other")])
    assert set(_identities(before, "hero")).isdisjoint(_identities(after, "hero"))
    hero_keys = lambda p: {v.storage_key for v in p.variants if v.row.row_id == "hero"}  # noqa: E731
    assert hero_keys(before).isdisjoint(hero_keys(after))
    assert _identities(before, "other") == _identities(after, "other")


def test_changing_steps_changes_every_identity(make_plan: Callable[..., Plan], tmp_path: Path) -> None:
    """Generation settings are part of the identity."""
    rows = [row("hero"), row("other")]
    before = make_plan(rows)
    after = make_plan(rows, settings=load_settings({"steps": 10}, env={}, cwd=tmp_path))
    assert set(_identities(before)).isdisjoint(_identities(after))
    assert {v.spec.steps for v in after.variants} == {10}
    assert {v.storage_key for v in before.variants}.isdisjoint(v.storage_key for v in after.variants)


@pytest.mark.parametrize("change", [{"seed": 1001}, {"channels": "instagram_portrait"}, {"negative_prompt": "blurry"}])
def test_other_inputs_change_identities(make_plan: Callable[..., Plan], change: dict[str, Any]) -> None:
    """Seed, channel and negative prompt each change the identity."""
    header = [*HEADER, "negative_prompt"]
    before = make_plan([row("hero", variants=1)], header=header)
    after = make_plan([row("hero", variants=1) | change], header=header)
    assert _identities(before) != _identities(after)


def test_adding_variants_keeps_existing_identities(make_plan: Callable[..., Plan]) -> None:
    """Raising a row's variant count adds images; the ones already made keep their identities."""
    two, four = make_plan([row("hero", variants=2)]), make_plan([row("hero", variants=4)])
    assert _identities(four)[:2] == _identities(two)


def test_storage_keys_end_with_identity_tag(make_plan: Callable[..., Plan]) -> None:
    """A key is campaign/row/channel/vNN-sSEED-<identity[:10]>.<ext>: a new prompt never overwrites an old file."""
    plan = make_plan([row("hero", "instagram_square, leaderboard", variants=2, seed=40)])
    for v in plan.variants:
        ext = EXTENSIONS[v.spec.out_format]
        assert v.storage_key.endswith(f"-{v.identity[:10]}.{ext}")
        assert v.storage_key.split("/")[2] == v.channel.name
        assert v.storage_key.split("/")[-1] == f"v{v.spec.variant_index:02d}-s{v.spec.seed}-{v.identity[:10]}.{ext}"
    assert len({v.storage_key for v in plan.variants}) == len(plan.variants)


# ------------------------------------------------------------------------------------------------ skipped rows


def test_commercial_row_refuses_non_commercial_model(make_plan: Callable[..., Plan], nc_model: Path) -> None:
    """A commercial row on a CC-BY-NC model is skipped with a 'license' problem naming the model; others plan."""
    plan = make_plan([row("ok"), row("nc", model=str(nc_model))])
    assert {v.row.row_id for v in plan.variants} == {"ok"}
    assert [r.row_id for r in plan.skipped_rows] == ["nc"]
    [problem] = plan.problems
    assert problem.column == "license"
    assert problem.line == 3 and problem.file.endswith(".csv")
    assert "NC Model" in problem.message and "cc-by-nc-sa-4.0" in problem.message


def test_license_any_allows_non_commercial_model(make_plan: Callable[..., Plan], nc_model: Path) -> None:
    """``license = any`` lets a non-commercial model through."""
    plan = make_plan([row("nc", model=str(nc_model), license="any")])
    assert plan.problems == []
    assert {v.model.license for v in plan.variants} == {"cc-by-nc-sa-4.0"}
    assert {v.model.commercial_use for v in plan.variants} == {False}


def test_strict_turns_a_licence_problem_into_a_rejection(make_plan: Callable[..., Plan], nc_model: Path) -> None:
    """With strict=True one unplannable row rejects the whole brief, listing the problem."""
    with pytest.raises(BriefError) as info:
        make_plan([row("ok"), row("nc", model=str(nc_model))], strict=True)
    assert [p.column for p in info.value.problems] == ["license"]
    assert "NC Model" in str(info.value)


def test_missing_model_file_is_a_model_problem(make_plan: Callable[..., Plan], tmp_path: Path) -> None:
    """A row naming a model file that does not exist is skipped with a 'model' problem naming the path."""
    missing = tmp_path / "models" / "gone.safetensors"
    plan = make_plan([row("ok"), row("lost", model=str(missing))])
    assert {v.row.row_id for v in plan.variants} == {"ok"}
    [problem] = plan.problems
    assert problem.column == "model" and str(missing) in problem.message


def test_every_row_bad_rejects_the_brief(make_plan: Callable[..., Plan], tmp_path: Path, nc_model: Path) -> None:
    """If no row can be planned, planning fails with every problem and a closing summary."""
    with pytest.raises(BriefError) as info:
        make_plan([row("lost", model=str(tmp_path / "gone.safetensors")), row("nc", model=str(nc_model))])
    problems = info.value.problems
    assert [p.column for p in problems] == ["model", "license", None]
    assert "no row of the brief can be rendered" in problems[-1].message


# ------------------------------------------------------------------------------------------------ model folders


def test_row_model_outside_the_model_folders_is_refused_without_looking_at_it(
        make_plan: Callable[..., Plan], tmp_path: Path, campaign_model: Path, nc_model: Path) -> None:
    """A brief cannot learn whether a file exists on the render machine, or its size: a path outside the model
    folders gets the same answer whether a file is there or not, '..' and symlinks cannot lead out, and the file
    is never opened. Inside a model folder the row plans as before."""
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    elsewhere.mkdir()
    (elsewhere / "three.safetensors").write_bytes(b"abc")  # "only 3 bytes" is what the old answer said
    (models / "escape.safetensors").symlink_to(elsewhere / "three.safetensors")
    (models / "nc.safetensors").symlink_to(nc_model)  # the link is in the folder, but it leads out: refused too
    settings = load_settings({"model_dirs": "models"}, env={}, cwd=tmp_path)
    resolver = Resolver()
    asked = {"there": elsewhere / "three.safetensors", "absent": elsewhere / "absent.safetensors",
             "dotdot": models / ".." / "elsewhere" / "three.safetensors", "link": models / "escape.safetensors",
             "nc": models / "nc.safetensors"}
    plan = make_plan([row("ok"), *(row(k, model=str(v), license="any") for k, v in asked.items())],
                     settings=settings, resolver=resolver)
    assert [v.row.row_id for v in plan.variants] == ["ok", "ok"]
    assert resolver.calls == [str(campaign_model)]  # only the run's default model was looked at
    assert [(p.line, p.column) for p in plan.problems] == [(n, "model") for n in range(3, 8)]
    shapes = {p.message.replace(str(v), "PATH") for p, v in zip(plan.problems, asked.values())}
    assert shapes == {"model 'PATH' is not in a model folder (setting model_dirs; allow_any_model_path lifts this): "
                      "put the file there, or ask whoever runs adforge to add its folder"}

    inside = make_plan([row("nc", model=str(models / "nc.safetensors"), license="any")],
                       settings=load_settings({"model_dirs": f"models{os.pathsep}{nc_model.parent}"}, env={}, cwd=tmp_path))
    assert inside.problems == [] and len(inside.variants) == 2
    anywhere = make_plan([row("nc", model=str(nc_model), license="any")],
                         settings=load_settings({"allow_any_model_path": True}, env={}, cwd=tmp_path))
    assert anywhere.problems == [] and len(anywhere.variants) == 2


def test_default_model_folders(tmp_path: Path, campaign_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without model_dirs: ./models where adforge runs, the bundled model's folder, and always the default model's."""
    from engine.bundled import bundled_model_path

    monkeypatch.chdir(tmp_path)
    folders = model_folders(load_settings(env={}, cwd=tmp_path), campaign_model)
    assert folders == [(tmp_path / "models").resolve(), bundled_model_path().parent.resolve(), campaign_model.parent.resolve()]
    configured = load_settings({"model_dirs": f"a{os.pathsep}/srv/models"}, env={}, cwd=tmp_path)
    assert configured.model_dirs == f"{(tmp_path / 'a').resolve().as_posix()}{os.pathsep}/srv/models"
    assert model_folders(configured, campaign_model)[:2] == [(tmp_path / "a").resolve(), Path("/srv/models").resolve()]


def test_brief_problems_come_first(make_plan: Callable[..., Plan]) -> None:
    """The brief's own problems (an invalid row) are kept ahead of planning problems; valid rows still plan."""
    plan = make_plan([row("ok"), row("bad", variants="zero")])  # type: ignore[arg-type]
    assert {v.row.row_id for v in plan.variants} == {"ok"}
    assert [p.column for p in plan.problems] == ["variants"]


def test_template_error_skips_the_row(make_plan: Callable[..., Plan]) -> None:
    """A row whose text breaks the template (an unbalanced {a|b} group) is skipped with a 'channels' problem."""
    plan = make_plan([row("ok"), row("broken", subject="shoe in {red|blue")])
    assert {v.row.row_id for v in plan.variants} == {"ok"}
    assert [r.row_id for r in plan.skipped_rows] == ["broken"]
    [problem] = plan.problems
    assert problem.column == "channels" and problem.line == 3
    assert "template 'default'" in problem.message and "'broken'" in problem.message


def test_custom_templates_dir(make_plan: Callable[..., Plan], tmp_path: Path) -> None:
    """settings.templates_dir (the root holding prompts/) supplies the templates; extra columns are variables, and a
    variable no row has is a problem naming it."""
    root = tmp_path / "brand-templates"
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "default.j2").write_text("{{ subject }}, {{ mood }}", encoding="utf-8")
    settings = load_settings({"templates_dir": str(root)}, env={}, cwd=tmp_path)
    plan = make_plan([row("happy", variants=1, mood="sunny")], settings=settings, header=[*HEADER, "mood"])
    assert [v.prompt.prompt for v in plan.variants] == ["running shoe happy, sunny"]
    with pytest.raises(BriefError) as info:
        make_plan([row("happy", variants=1)], settings=settings)
    assert info.value.problems[0].column == "channels"
    assert "variable 'mood' is undefined" in info.value.problems[0].message


def test_brief_object_is_kept(make_plan: Callable[..., Plan]) -> None:
    """The plan carries the brief it was made from."""
    plan = make_plan([row("hero")])
    assert isinstance(plan.brief, Brief) and plan.brief.path.name.startswith("brief-")
