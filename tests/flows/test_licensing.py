"""Model licences: registering model files, discovering them from their own metadata, and refusing a model a brief
row may not use. Database tests run on SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engine.checkpoint import CheckpointError
from engine.random_checkpoint import write_random_sd1
from flows.licence_policy import KNOWN_LICENSES, LicenseError, check_license, normalize_license
from flows.model_registry import ModelInfo, describe_model, ensure_model, register_model
from storage.database import Database
from storage.schema import AuditEntry, ModelRecord

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint that declares no licence (and no title)."""
    return Path(write_random_sd1(tmp_path_factory.mktemp("lic") / "plain-model.safetensors", seed=12))


@pytest.fixture(scope="module")
def odd_licence_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint declaring a licence id adforge does not know."""
    return Path(write_random_sd1(
        tmp_path_factory.mktemp("lic") / "odd-model.safetensors", seed=13, metadata={"modelspec.license": "Brand Internal 1.0"},
    ))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _models(db: Database) -> list[ModelRecord]:
    with db.session() as s:
        return list(s.scalars(select(ModelRecord).order_by(ModelRecord.id)))


def _audit(db: Database) -> list[AuditEntry]:
    with db.session() as s:
        return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def _counts(db: Database) -> tuple[int, int]:
    with db.session() as s:
        return (s.scalar(select(func.count()).select_from(ModelRecord)),
                s.scalar(select(func.count()).select_from(AuditEntry)))


# ------------------------------------------------------------------------------------------------ licence ids


def test_known_licence_table_uses_normalised_ids() -> None:
    """Every key of KNOWN_LICENSES is already normalised, or a lookup of a user's id could never match it."""
    assert all(normalize_license(k) == k for k in KNOWN_LICENSES)
    assert KNOWN_LICENSES["creativeml-openrail-m"] is True
    assert KNOWN_LICENSES["cc-by-nc-sa-4.0"] is False


@pytest.mark.parametrize("given, normal", [
    ("Apache-2.0", "apache-2.0"), (" CC BY NC 4.0 ", "cc-by-nc-4.0"), ("creativeml_openrail_m", "creativeml-openrail-m"),
    ("openrail++", "creativeml-openrail++-m"),  # the Hub model cards of SD 2.x and SDXL
])
def test_normalize_license(given: str, normal: str) -> None:
    """Case, spaces and underscores do not matter in licence ids."""
    assert normalize_license(given) == normal


# ------------------------------------------------------------------------------------------------ register_model


@pytest.mark.parametrize("licence, normal, commercial", [
    ("Apache-2.0", "apache-2.0", True),
    ("CC BY-NC 4.0", "cc-by-nc-4.0", False),
    ("CreativeML OpenRAIL-M", "creativeml-openrail-m", True),
])
def test_register_known_licence_takes_commercial_flag_from_table(db: Database, plain_model: Path, licence: str,
                                                                 normal: str, commercial: bool) -> None:
    """A known licence id needs no --commercial: the table decides; the row and an audit entry are written."""
    info = register_model(db, plain_model, licence, actor="alice")
    sha = _sha256(plain_model)
    assert (info.license, info.commercial_use, info.sha256, info.short_hash) == (normal, commercial, sha, sha[:10])
    assert (info.name, info.family, info.native_size) == ("plain-model", "sd1", 512)
    [row] = _models(db)
    assert row.id == info.id
    assert (row.license, row.commercial_use, row.license_source) == (normal, commercial, "registered")
    assert (row.sha256, row.path, row.kind) == (sha, str(plain_model.resolve()), "checkpoint")
    [entry] = _audit(db)
    assert (entry.actor, entry.action, entry.entity, entry.entity_id) == ("alice", "model.registered", "model", str(info.id))
    assert entry.before is None
    assert entry.after == {"path": str(plain_model.resolve()), "sha256": sha, "license": normal, "commercial_use": commercial}


def test_register_unknown_licence_needs_commercial_flag(db: Database, plain_model: Path) -> None:
    """An id adforge does not know is refused without an explicit commercial flag, and nothing is written."""
    with pytest.raises(LicenseError, match=r"unknown licence 'Brand-EULA'.*--commercial yes\|no"):
        register_model(db, plain_model, "Brand-EULA")
    assert _counts(db) == (0, 0)


@pytest.mark.parametrize("commercial", [True, False])
def test_register_unknown_licence_with_commercial_flag(db: Database, plain_model: Path, commercial: bool) -> None:
    """With the flag stated, an unknown licence is registered as given."""
    info = register_model(db, plain_model, "Brand-EULA", commercial, name="brand-v1")
    assert (info.license, info.commercial_use, info.name) == ("brand-eula", commercial, "brand-v1")
    assert (_models(db)[0].commercial_use, _models(db)[0].name) == (commercial, "brand-v1")


def test_explicit_flag_overrides_the_table(db: Database, plain_model: Path) -> None:
    """A company may forbid commercial use of a model whose licence would allow it."""
    assert register_model(db, plain_model, "Apache-2.0", False).commercial_use is False


def test_register_refuses_empty_licence_and_missing_file(db: Database, plain_model: Path, tmp_path: Path) -> None:
    """Blank licence ids and paths that are not files are LicenseErrors; nothing is written."""
    with pytest.raises(LicenseError, match="must not be empty"):
        register_model(db, plain_model, "   ")
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(LicenseError, match="no such model file") as info:
        register_model(db, missing, "Apache-2.0")
    assert str(missing) in str(info.value)
    assert _counts(db) == (0, 0)


def test_register_refuses_a_file_that_is_not_a_model(db: Database, tmp_path: Path) -> None:
    """A file that is not a checkpoint is a CheckpointError naming it."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not tensors")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        register_model(db, junk, "Apache-2.0")
    assert _counts(db) == (0, 0)


def test_reregister_updates_the_row_and_audits_before_and_after(db: Database, plain_model: Path) -> None:
    """Registering the same file again changes its one row in place; the audit log keeps old and new."""
    first = register_model(db, plain_model, "Apache-2.0")
    second = register_model(db, plain_model, "CC-BY-NC-4.0", name="renamed")
    assert second.id == first.id
    [row] = _models(db)
    assert (row.license, row.commercial_use, row.name, row.license_source) == ("cc-by-nc-4.0", False, "renamed", "registered")
    entries = _audit(db)
    assert [e.action for e in entries] == ["model.registered", "model.registered"]
    assert entries[1].entity_id == str(first.id)
    assert entries[1].before == {"license": "apache-2.0", "commercial_use": True, "license_source": "registered"}
    assert entries[1].after["license"] == "cc-by-nc-4.0" and entries[1].after["commercial_use"] is False


def test_register_after_discovery_records_the_file_metadata_as_before(db: Database, nc_model: Path) -> None:
    """A model first entered from its file metadata and then registered keeps that history in the audit log."""
    discovered = ensure_model(db, nc_model)
    registered = register_model(db, nc_model, "Apache-2.0", name="relicensed")
    assert registered.id == discovered.id
    assert _audit(db)[-1].before == {"license": "cc-by-nc-sa-4.0", "commercial_use": False, "license_source": "file-metadata"}


# ------------------------------------------------------------------------------------------------ ensure_model


def test_ensure_model_takes_licence_from_file_metadata(db: Database, nc_model: Path) -> None:
    """An unregistered file declaring ``modelspec.license`` is entered with that licence, from the file."""
    info = ensure_model(db, nc_model)
    assert (info.license, info.commercial_use, info.name, info.native_size) == ("cc-by-nc-sa-4.0", False, "NC Model", 512)
    [row] = _models(db)
    assert (row.license_source, row.sha256, row.path) == ("file-metadata", _sha256(nc_model), str(nc_model.resolve()))
    [entry] = _audit(db)
    assert (entry.action, entry.actor, entry.entity_id) == ("model.discovered", "system:run", str(info.id))
    assert entry.after["license_source"] == "file-metadata" and entry.after["commercial_use"] is False


def test_ensure_model_without_licence_metadata_is_unknown(db: Database, plain_model: Path) -> None:
    """A file declaring nothing is entered with no licence and commercial use unknown (None, not False)."""
    info = ensure_model(db, plain_model)
    assert (info.license, info.commercial_use, info.name) == (None, None, "plain-model")
    [row] = _models(db)
    assert (row.license, row.commercial_use, row.license_source) == (None, None, "unknown")


def test_ensure_model_with_undeclared_commercial_status(db: Database, odd_licence_model: Path) -> None:
    """A declared licence adforge does not know keeps its id, but commercial use stays unknown."""
    info = ensure_model(db, odd_licence_model)
    assert (info.license, info.commercial_use) == ("brand-internal-1.0", None)
    assert _models(db)[0].license_source == "file-metadata"


def test_ensure_model_reads_native_size(db: Database, campaign_model: Path) -> None:
    """``adforge.native_size`` in the file sets the model's native size; Apache-2.0 allows commercial use."""
    info = ensure_model(db, campaign_model)
    assert (info.native_size, info.license, info.commercial_use, info.name) == (64, "apache-2.0", True, "campaign-tiny")


def test_ensure_model_twice_is_one_row_and_one_audit_entry(db: Database, nc_model: Path) -> None:
    """The second use of a known file finds its row and writes nothing new."""
    a, b = ensure_model(db, nc_model), ensure_model(db, nc_model)
    assert a == b
    assert _counts(db) == (1, 1)


def test_registered_licence_wins_over_file_metadata(db: Database, nc_model: Path) -> None:
    """Once someone registered a licence, the file's own claim no longer matters."""
    register_model(db, nc_model, "Apache-2.0")
    info = ensure_model(db, nc_model)
    assert (info.license, info.commercial_use) == ("apache-2.0", True)
    assert _models(db)[0].license_source == "registered"


def test_same_bytes_elsewhere_are_the_same_model(db: Database, nc_model: Path, tmp_path: Path) -> None:
    """A copied or moved file is recognised by its sha256: the same row, with the path updated."""
    first = ensure_model(db, nc_model)
    copy = tmp_path / "elsewhere" / "renamed-copy.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(nc_model, copy)
    again = ensure_model(db, copy)
    assert again.id == first.id and again.sha256 == first.sha256
    [row] = _models(db)
    assert row.path == str(copy.resolve())
    assert register_model(db, copy, "CC-BY-NC-SA-4.0").id == first.id
    assert describe_model(copy, db).id == first.id
    assert len(_models(db)) == 1


def test_ensure_model_missing_file(db: Database, tmp_path: Path) -> None:
    """A model path that does not exist is a CheckpointError naming it, and nothing is written."""
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        ensure_model(db, tmp_path / "gone.safetensors")
    assert _counts(db) == (0, 0)


# ------------------------------------------------------------------------------------------------ describe_model


def test_describe_model_writes_nothing(db: Database, nc_model: Path, plain_model: Path) -> None:
    """Describing (what ``plan`` does) reports what the file declares and leaves the database untouched."""
    nc = describe_model(nc_model, db)
    plain = describe_model(plain_model, db)
    assert (nc.id, nc.license, nc.commercial_use, nc.name, nc.sha256) == (0, "cc-by-nc-sa-4.0", False, "NC Model", _sha256(nc_model))
    assert (plain.id, plain.license, plain.commercial_use) == (0, None, None)
    assert _counts(db) == (0, 0)


def test_describe_model_prefers_the_registered_row(db: Database, plain_model: Path) -> None:
    """With a registered row, describe returns it (its id and licence)."""
    registered = register_model(db, plain_model, "MIT")
    described = describe_model(plain_model, db)
    assert described == registered
    assert _counts(db) == (1, 1)


def test_describe_model_without_database(campaign_model: Path, tmp_path: Path) -> None:
    """No database at all: the file's own declarations; a missing file is a CheckpointError."""
    info = describe_model(campaign_model)
    assert (info.id, info.license, info.commercial_use, info.native_size) == (0, "apache-2.0", True, 64)
    with pytest.raises(CheckpointError):
        describe_model(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------------ check_license


def _info(license: str | None, commercial: bool | None) -> ModelInfo:
    return ModelInfo(id=1, path="/models/brand.safetensors", name="brand", sha256="ab" * 32, short_hash="abababab12",
                     family="sd1", license=license, commercial_use=commercial, native_size=512)


def test_check_license_allows() -> None:
    """Commercial models serve every row; ``any`` rows accept every model."""
    assert check_license(_info("apache-2.0", True), "commercial") is None
    assert check_license(_info("apache-2.0", True), "any") is None
    assert check_license(_info("cc-by-nc-4.0", False), "any") is None
    assert check_license(_info(None, None), "any") is None


def test_check_license_forbidden_message() -> None:
    """A non-commercial model on a commercial row: the reason names model, hash and licence, and the way out."""
    message = check_license(_info("cc-by-nc-4.0", False), "commercial")
    assert message is not None
    for part in ("'brand'", "abababab12", "'cc-by-nc-4.0'", "forbids commercial use", "'any'"):
        assert part in message


def test_check_license_unknown_message() -> None:
    """A model with no licence on record is refused for commercial rows, and the message says how to register it."""
    message = check_license(_info(None, None), "commercial")
    assert message is not None
    assert "'brand'" in message and "no licence on record" in message
    assert "adforge models add /models/brand.safetensors --license" in message


def test_check_license_unknown_commercial_status_names_the_licence() -> None:
    """A licence on record whose commercial status is unknown is named, not called missing."""
    message = check_license(_info("brand-internal-1.0", None), "commercial")
    assert message is not None
    assert "brand-internal-1.0" in message and "no licence on record" not in message
    assert "adforge models add /models/brand.safetensors" in message and "--commercial yes|no" in message


@pytest.mark.parametrize("declared", ["0", "-64", "100000"])
def test_a_native_size_no_model_has_is_refused_naming_the_file(tmp_path: Path, declared: str) -> None:
    """Planning sizes every channel from a model's native size: one it cannot have is a clear error, not a crash."""
    path = Path(write_random_sd1(tmp_path / "odd.safetensors", seed=3, metadata={"adforge.native_size": declared}))
    with pytest.raises(CheckpointError, match=rf"odd\.safetensors.*adforge\.native_size {declared}, not a size in 8 \.\. 8192 px"):
        describe_model(path)
