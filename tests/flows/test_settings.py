"""Run settings: flag > environment > adforge.toml > defaults, and the errors a bad config file gives.

Every test passes ``env`` and ``cwd`` explicitly, so neither the developer's environment nor the folder pytest
runs in can change a result."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.settings import ENV_VARS, Settings, SettingsError, load_settings
from storage.database import sqlite_url
from tests.helpers import write_text


# ------------------------------------------------------------------------------------------------ defaults


def test_defaults_live_under_adforge_data_in_cwd(tmp_path: Path) -> None:
    """Without config, env or flags: SQLite and assets under ./adforge-data/, bundled model, documented defaults."""
    s = load_settings(env={}, cwd=tmp_path)
    assert s.db_url == sqlite_url(tmp_path / "adforge-data" / "adforge.db")
    assert s.db_url.startswith("sqlite:///")
    assert s.store_url == (tmp_path / "adforge-data" / "assets").resolve().as_posix()
    assert s.model is None
    assert (s.sampler, s.steps, s.cfg_scale, s.clip_skip, s.batch_size, s.device) == ("DPM++ 2M Karras", 25, 7.0, 1, 4, "auto")


def test_loading_creates_nothing(tmp_path: Path) -> None:
    """Resolving settings does not create the data folder (only a run does)."""
    load_settings(env={}, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ precedence


@pytest.mark.parametrize("key, file_value, env_value, flag_value", [
    ("db_url", "sqlite:////srv/file.db", "sqlite:////srv/env.db", "sqlite:////srv/flag.db"),
    ("store_url", "s3://file-bucket/a", "s3://env-bucket/a", "s3://flag-bucket/a"),
    ("model", "/models/file.safetensors", "/models/env.safetensors", "/models/flag.safetensors"),
])
def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path, key: str, file_value: str, env_value: str,
                                                         flag_value: str) -> None:
    """Each layer overrides the one below it, for every setting that has an environment variable."""
    default = getattr(load_settings(env={}, cwd=tmp_path), key)
    write_text(tmp_path / "adforge.toml", f'{key} = "{file_value}"\n')
    env = {ENV_VARS[key]: env_value}
    assert getattr(load_settings(env={}, cwd=tmp_path), key) == file_value != default
    assert getattr(load_settings(env=env, cwd=tmp_path), key) == env_value
    assert getattr(load_settings({key: flag_value}, env=env, cwd=tmp_path), key) == flag_value
    assert getattr(load_settings({key: None}, env=env, cwd=tmp_path), key) == env_value  # None = flag not given


def test_environment_variable_names() -> None:
    """The documented variable names."""
    assert ENV_VARS["db_url"] == "ADFORGE_DB_URL"
    assert ENV_VARS["store_url"] == "ADFORGE_STORE_URL"
    assert ENV_VARS["model"] == "ADFORGE_MODEL"


def test_empty_environment_variable_is_ignored(tmp_path: Path) -> None:
    """``ADFORGE_DB_URL=`` (set but empty) does not blank out the file's value."""
    write_text(tmp_path / "adforge.toml", 'db_url = "sqlite:////srv/file.db"\n')
    assert load_settings(env={"ADFORGE_DB_URL": ""}, cwd=tmp_path).db_url == "sqlite:////srv/file.db"


def test_flags_override_file_for_numbers(tmp_path: Path) -> None:
    """Numeric settings from the file are overridden by flags and coerced to their types."""
    write_text(tmp_path / "adforge.toml", "steps = 30\ncfg_scale = 5\n")
    s = load_settings(env={}, cwd=tmp_path)
    assert (s.steps, s.cfg_scale) == (30, 5.0) and isinstance(s.cfg_scale, float)
    s = load_settings({"steps": 12, "cfg_scale": 4.5}, env={}, cwd=tmp_path)
    assert (s.steps, s.cfg_scale) == (12, 4.5)


# ------------------------------------------------------------------------------------------------ config file location and layout


def test_adforge_table_and_bare_keys_are_equivalent(tmp_path: Path) -> None:
    """A top-level ``[adforge]`` table and bare keys give the same settings."""
    bare, table = tmp_path / "bare", tmp_path / "table"
    body = 'model = "/m/brand.safetensors"\nsampler = "Euler a"\nsteps = 20\ncfg_scale = 6.5\nbatch_size = 2\n'
    write_text(bare / "adforge.toml", body)
    write_text(table / "adforge.toml", "[adforge]\n" + body)
    a, b = load_settings(env={}, cwd=bare), load_settings(env={}, cwd=table)
    assert (a.model, a.sampler, a.steps, a.cfg_scale, a.batch_size) == ("/m/brand.safetensors", "Euler a", 20, 6.5, 2)
    cwd_relative = {"db_url": "", "store_url": "", "lora_dir": "", "embeddings_dir": ""}
    assert a.to_dict() | cwd_relative == b.to_dict() | cwd_relative


def test_explicit_config_beats_adforge_config_beats_cwd_file(tmp_path: Path) -> None:
    """``config=`` wins over ``ADFORGE_CONFIG``, which wins over ./adforge.toml; only one file is read."""
    write_text(tmp_path / "adforge.toml", 'sampler = "from-cwd"\nsteps = 11\n')
    env_file = write_text(tmp_path / "etc" / "env.toml", 'sampler = "from-env"\n')
    flag_file = write_text(tmp_path / "etc" / "flag.toml", 'sampler = "from-flag"\n')
    assert load_settings(env={}, cwd=tmp_path).sampler == "from-cwd"
    via_env = load_settings(env={"ADFORGE_CONFIG": str(env_file)}, cwd=tmp_path)
    assert (via_env.sampler, via_env.steps) == ("from-env", 25)  # the cwd file is not merged in
    assert load_settings(config=flag_file, env={"ADFORGE_CONFIG": str(env_file)}, cwd=tmp_path).sampler == "from-flag"


def test_relative_config_path_is_relative_to_cwd(tmp_path: Path) -> None:
    """``--config custom.toml`` / ``ADFORGE_CONFIG=custom.toml`` mean the file in the folder adforge runs in."""
    write_text(tmp_path / "custom.toml", "steps = 9\n")
    assert load_settings(config="custom.toml", env={}, cwd=tmp_path).steps == 9
    assert load_settings(env={"ADFORGE_CONFIG": "custom.toml"}, cwd=tmp_path).steps == 9


def test_relative_store_path_is_resolved_against_cwd(tmp_path: Path) -> None:
    """A local store path in the file or the environment is relative to where adforge runs; URLs stay as given."""
    write_text(tmp_path / "adforge.toml", 'store_url = "out/assets"\n')
    assert load_settings(env={}, cwd=tmp_path).store_url == (tmp_path / "out" / "assets").resolve().as_posix()
    env = {"ADFORGE_STORE_URL": "../shared-assets"}
    assert load_settings(env=env, cwd=tmp_path).store_url == (tmp_path.parent / "shared-assets").resolve().as_posix()
    assert load_settings({"store_url": "s3://bucket/prefix"}, env=env, cwd=tmp_path).store_url == "s3://bucket/prefix"
    absolute = (tmp_path / "abs").as_posix()
    assert load_settings({"store_url": absolute}, env={}, cwd=tmp_path).store_url == absolute


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    """A misspelt setting is an error naming the file and the key, not silently ignored."""
    cfg = write_text(tmp_path / "adforge.toml", 'stepz = 30\n')
    with pytest.raises(SettingsError) as info:
        load_settings(env={}, cwd=tmp_path)
    assert str(cfg) in str(info.value) and "'stepz'" in str(info.value)


def test_unknown_key_inside_adforge_table(tmp_path: Path) -> None:
    """The same check applies inside ``[adforge]``."""
    write_text(tmp_path / "adforge.toml", '[adforge]\ndatabase = "sqlite://"\n')
    with pytest.raises(SettingsError, match="unknown setting 'database'"):
        load_settings(env={}, cwd=tmp_path)


@pytest.mark.parametrize("line, key", [
    ('steps = "many"', "steps"),
    ("steps = 2.5", "steps"),
    ("steps = true", "steps"),
    ('cfg_scale = "high"', "cfg_scale"),
    ("cfg_scale = false", "cfg_scale"),
    ("batch_size = [4]", "batch_size"),
    ("db_url = 5", "db_url"),
    ("model = true", "model"),
    ("sampler = ['Euler']", "sampler"),
])
def test_wrong_type_names_file_and_key(tmp_path: Path, line: str, key: str) -> None:
    """A value of the wrong type is an error naming the file and the key."""
    cfg = write_text(tmp_path / "adforge.toml", line + "\n")
    with pytest.raises(SettingsError) as info:
        load_settings(env={}, cwd=tmp_path)
    assert str(cfg) in str(info.value) and f"'{key}'" in str(info.value)


def test_adforge_that_is_not_a_table_is_a_settings_error(tmp_path: Path) -> None:
    """``adforge = "..."`` (a value, not a table) is reported, not a crash."""
    cfg = write_text(tmp_path / "adforge.toml", 'adforge = "yes"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(env={}, cwd=tmp_path)
    assert str(cfg) in str(info.value) and "adforge" in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A file that is not TOML is an error naming the file (with TOML's line information)."""
    cfg = write_text(tmp_path / "adforge.toml", "steps = = 3\n")
    with pytest.raises(SettingsError, match="invalid TOML") as info:
        load_settings(env={}, cwd=tmp_path)
    assert str(cfg) in str(info.value) and "line 1" in str(info.value)


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    """A config file named by ``config=`` or ``ADFORGE_CONFIG`` must exist (a missing ./adforge.toml is fine)."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match="cannot read config file") as info:
        load_settings(config=missing, env={}, cwd=tmp_path)
    assert str(missing) in str(info.value)
    with pytest.raises(SettingsError, match="nope.toml"):
        load_settings(env={"ADFORGE_CONFIG": str(missing)}, cwd=tmp_path)


@pytest.mark.parametrize("overrides", [{"steps": 0}, {"batch_size": 0}, {"cfg_scale": -1.0}])
def test_out_of_range_numbers_are_rejected(tmp_path: Path, overrides: dict) -> None:
    """Zero steps / batch size and a negative CFG scale are refused, naming the setting and where it came from."""
    [key] = overrides
    with pytest.raises(SettingsError, match=f"command line: '{key}' must be >= "):
        load_settings(overrides, env={}, cwd=tmp_path)


def test_out_of_range_number_in_the_config_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "adforge.toml").write_text("steps = 0\n")
    with pytest.raises(SettingsError) as info:
        load_settings(env={}, cwd=tmp_path)
    assert str(info.value) == f"{tmp_path / 'adforge.toml'}: 'steps' must be >= 1, got 0"


def test_wrong_type_flag_names_the_command_line(tmp_path: Path) -> None:
    """A flag value of the wrong type is blamed on the command line."""
    with pytest.raises(SettingsError, match="command line: 'steps'"):
        load_settings({"steps": "lots"}, env={}, cwd=tmp_path)


# ------------------------------------------------------------------------------------------------ briefs: model folders and limits


def test_model_folders_and_any_path_settings(tmp_path: Path) -> None:
    """``model_dirs``: a TOML list or an os.pathsep-joined string (ADFORGE_MODEL_DIRS), relative to where adforge
    runs; ``allow_any_model_path``: a boolean, from TOML or the environment (true/false/1/0/yes/no)."""
    import os

    s = load_settings(env={}, cwd=tmp_path)
    assert (s.model_dirs, s.allow_any_model_path) == (None, False)
    write_text(tmp_path / "adforge.toml", 'model_dirs = ["models", "/srv/ckpt"]\nallow_any_model_path = true\n')
    s = load_settings(env={}, cwd=tmp_path)
    assert s.model_dirs == os.pathsep.join([(tmp_path / "models").resolve().as_posix(), "/srv/ckpt"])
    assert s.allow_any_model_path is True
    env = {"ADFORGE_MODEL_DIRS": "/a", "ADFORGE_ALLOW_ANY_MODEL_PATH": "no"}
    assert (load_settings(env=env, cwd=tmp_path).model_dirs, load_settings(env=env, cwd=tmp_path).allow_any_model_path) == ("/a", False)
    with pytest.raises(SettingsError) as info:
        load_settings(env={"ADFORGE_ALLOW_ANY_MODEL_PATH": "maybe"}, cwd=tmp_path)
    assert str(info.value) == "ADFORGE_ALLOW_ANY_MODEL_PATH: 'allow_any_model_path' must be true or false, got 'maybe'"


def test_brief_limits_are_settings_with_defaults_and_a_floor(tmp_path: Path) -> None:
    s = load_settings(env={}, cwd=tmp_path)
    assert (s.brief_max_bytes, s.brief_max_xlsx_bytes, s.brief_max_rows, s.brief_max_cells, s.brief_max_cell_chars,
            s.brief_max_variants_per_row, s.brief_max_variants_per_brief) == (
        16 * 2**20, 64 * 2**20, 10_000, 500_000, 10_000, 1_000, 100_000)
    write_text(tmp_path / "adforge.toml", "brief_max_rows = 0\n")
    with pytest.raises(SettingsError) as info:
        load_settings(env={}, cwd=tmp_path)
    assert str(info.value) == f"{tmp_path / 'adforge.toml'}: 'brief_max_rows' must be >= 1, got 0"


# ------------------------------------------------------------------------------------------------ redaction


def test_redacted_hides_the_database_password() -> None:
    """``redacted()`` (what runs record) shows user, host and database but never the password."""
    s = Settings(db_url="postgresql+psycopg://adforge:hunter2@db.internal:5432/adforge", store_url="s3://b/p")
    out = s.redacted()
    assert "hunter2" not in out["db_url"]
    assert out["db_url"] == "postgresql+psycopg://adforge:***@db.internal:5432/adforge"
    assert out["store_url"] == "s3://b/p" and out["steps"] == s.steps
    assert s.db_url.endswith("hunter2@db.internal:5432/adforge")  # the settings themselves are untouched


def test_redacted_unparseable_url() -> None:
    """A URL that cannot be parsed is not echoed (it might hold a password)."""
    assert Settings(db_url="::not a url::", store_url="x").redacted()["db_url"] == "<unparseable>"
