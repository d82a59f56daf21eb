"""Secrets stay out of logs and files others can read; names from the environment are checked;
the worker's web server listens on loopback unless told otherwise (review defects, issue #14 §10)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Settings, mask_dsn


@pytest.mark.parametrize("dsn", [
    "postgresql://u@db/x?password=hunter2",
    "postgresql://u@db/x?sslmode=require&password=hunter2",
    "postgresql://u:hunter2@db/x?password=hunter2",
    "host=db user=u password=hunter2 dbname=x",
])
def test_mask_dsn_hides_every_password_form(dsn: str) -> None:
    masked = mask_dsn(dsn)
    assert "hunter2" not in masked
    assert "****" in masked


def test_describe_never_shows_a_query_string_password() -> None:
    s = Settings.from_env({"DICOMFLOW_POSTGRES_DSN": "postgresql://u@db/x?password=hunter2"})
    assert "hunter2" not in repr(s.describe())


@pytest.mark.parametrize("name", ["dicom_image_meta; DROP", "../x", "a/b", "t?x=1", "", "x" * 65])
def test_doris_table_names_are_identifiers(name: str) -> None:
    if name == "":
        # empty means "not set": the default name is used
        assert Settings.from_env({"DICOMFLOW_DORIS_IMAGE_TABLE": name}).doris_table("image") == "dicom_image_meta"
        return
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DICOMFLOW_DORIS_IMAGE_TABLE": name})
    assert err.value.field == "DICOMFLOW_DORIS_IMAGE_TABLE"


def test_doris_database_is_an_identifier() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DICOMFLOW_DORIS_DATABASE": "db/../other"})
    assert err.value.field == "DICOMFLOW_DORIS_DATABASE"


def test_web_server_binds_loopback_by_default_and_is_configurable(tmp_path: Path) -> None:
    from streams.app import create_app

    env = {"DICOMFLOW_HOME": str(tmp_path), "DICOMFLOW_BROKER": "kafka://127.0.0.1:1"}
    assert Settings.from_env(env).web_bind == "127.0.0.1"
    app = create_app(Settings.from_env(env))
    assert app.conf.web_bind == "127.0.0.1"
    other = create_app(Settings.from_env({**env, "DICOMFLOW_WEB_BIND": "0.0.0.0"}))
    assert other.conf.web_bind == "0.0.0.0"


def test_secret_file_is_created_private(tmp_path: Path) -> None:
    from dicomflow.stack import write_private

    path = tmp_path / "postgres.dsn"
    write_private(path, "postgresql://u:hunter2@db/x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "postgresql://u:hunter2@db/x"
    write_private(path, "postgresql://u:other@db/x")  # replaced, never widened
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "postgresql://u:other@db/x"
