"""SD 2.x and SDXL files in the model registry: their family and the native size channels are planned at."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from engine.random_checkpoint import write_random
from flows.model_registry import describe_model


def _without_native_size(path: Path) -> Path:
    """The file as a downloaded one is: no adforge metadata saying its size."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "adforge.native_size"}
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("family, registered, native", [
    ("sd2", "sd2", 512), ("sd2-v", "sd2", 768), ("sdxl", "sdxl", 1024),
])
def test_family_and_native_size_of_sd2_and_sdxl_files(tmp_path: Path, family: str, registered: str, native: int) -> None:
    path = _without_native_size(Path(write_random(tmp_path / f"{family}.safetensors", family)))
    info = describe_model(path)
    assert (info.family, info.kind, info.native_size) == (registered, "checkpoint", native)


# ---- diffusers folders: registered, described and rendered like single files -------------------------------------

CARD = "---\nlicense: apache-2.0\ntags:\n- text-to-image\n---\n# campaign tiny, as a diffusers folder\n"


@pytest.fixture(scope="module")
def campaign_folder(tmp_path_factory: pytest.TempPathFactory, campaign_model: Path) -> Path:
    """The campaign test model (SD 1.x, 64 px native) saved by diffusers as a folder, sharded, with a model card
    that declares its licence, as a Hub download has."""
    pytest.importorskip("diffusers")
    from tests.engine.test_diffusers_folder import _write_folder

    folder = tmp_path_factory.mktemp("folders") / "campaign-tiny-1.0"
    _write_folder("sd1", campaign_model, folder, max_shard_size="200KB")
    (folder / "README.md").write_text(CARD, encoding="utf-8")
    return folder


def test_a_folder_is_described_like_its_file(campaign_folder: Path, campaign_model: Path) -> None:
    from engine.diffusers_folder import folder_sha256

    folder, file = describe_model(campaign_folder), describe_model(campaign_model)
    assert (folder.family, folder.kind, folder.native_size) == (file.family, file.kind, file.native_size) == ("sd1", "checkpoint", 64)
    assert folder.sha256 == folder_sha256(campaign_folder) != file.sha256
    assert (folder.name, folder.license, folder.commercial_use) == ("campaign-tiny-1.0", "apache-2.0", True)


def test_a_campaign_renders_on_a_registered_folder(tmp_path: Path, campaign_folder: Path, sqlite_db_url: str,
                                                    campaign_caches: None) -> None:
    from sqlalchemy import select

    from flows.campaign import campaign_run
    from flows.model_registry import register_model
    from storage.assets import open_store
    from storage.database import open_database
    from storage.image_metadata import parse_infotext, read_image_metadata
    from storage.schema import Asset, ModelRecord
    from tests.helpers import write_brief

    db = open_database(sqlite_db_url)
    info = register_model(db, campaign_folder, "cc-by-4.0", name="tiny folder")
    assert (info.family, info.license, info.commercial_use) == ("sd1", "cc-by-4.0", True)
    brief = write_brief(tmp_path / "brief.csv", ["c1,r1,a red circle,instagram_square,2,commercial"],
                        ["campaign", "row_id", "subject", "channels", "variants", "license"])
    store_url = str(tmp_path / "assets")
    summary = campaign_run(str(brief), overrides={"db_url": sqlite_db_url, "store_url": store_url,
                                                  "model": str(campaign_folder), "steps": 2, "batch_size": 2})
    assert summary["status"] == "completed", summary
    assert summary["counts"]["rendered"] == 2
    with db.session() as s:
        assert [(m.sha256, m.path) for m in s.scalars(select(ModelRecord))] == [(info.sha256, str(campaign_folder.resolve()))]
        keys = [a.storage_key for a in s.scalars(select(Asset))]
    store = open_store(store_url)
    for key in keys:
        params = parse_infotext(read_image_metadata(store.get(key))[0])[2]
        assert (params["Model"], params["Model hash"]) == ("tiny folder", info.short_hash)
    db.dispose()
