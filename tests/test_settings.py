"""Settings: environment parsing, errors naming the variable, secrets never printed."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.settings import EMBEDDED_PROFILE, PRODUCTION_PROFILE, Settings, mask_dsn


def test_defaults_use_the_embedded_stack() -> None:
    s = Settings.from_env({"DICOMFLOW_HOME": "/data"})
    assert s.embedded_broker and s.profile is EMBEDDED_PROFILE
    assert str(s.storage_root) == "/data/storage" and s.series_window_seconds == 5.0
    assert s.postgres_dsn is None and not s.doris_enabled
    assert (s.doris_idle_flush, s.doris_idle_spacing) == (1.0, 5.0)
    assert Settings.from_env({"DICOMFLOW_DORIS_IDLE_SPACING": "2.5"}).doris_idle_spacing == 2.5


def test_production_broker_keeps_normal_client_settings() -> None:
    s = Settings.from_env({"DICOMFLOW_BROKER": "kafka://rp:9092"})
    assert s.profile is PRODUCTION_PROFILE and s.broker_url == "kafka://rp:9092"


@pytest.mark.parametrize(("name", "value"), [("DICOMFLOW_PARTITIONS", "x"), ("DICOMFLOW_PARTITIONS", "0"),
                                             ("DICOMFLOW_SERIES_WINDOW_SECONDS", "soon"),
                                             ("DICOMFLOW_BROKER", "localhost:9092"),
                                             ("DICOMFLOW_TENANT_BY_CALLING_AE", "CT01"),
                                             ("DICOMFLOW_BROKER_PROFILE", "rabbit"),
                                             ("DICOMFLOW_DORIS_IDLE_SPACING", "-1")])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert info.value.field == name


def test_secrets_never_print() -> None:
    s = Settings.from_env({"DICOMFLOW_POSTGRES_DSN": "postgresql://u:hunter2@db/x",
                           "DICOMFLOW_DORIS_FE_URL": "http://fe:8030", "DICOMFLOW_DORIS_PASSWORD": "s3cret"})
    text = repr(s) + str(s.describe())
    assert "hunter2" not in text and "s3cret" not in text
    assert mask_dsn("postgresql://u:hunter2@db/x") == "postgresql://u:****@db/x"
    assert s.postgres_dsn is not None and s.postgres_dsn.get().endswith("@db/x")


def test_tenant_maps() -> None:
    s = Settings.from_env({"DICOMFLOW_TENANT_BY_CALLING_AE": "CT01=hosp-a, MR02=hosp-b"})
    assert s.tenant_by_calling_ae == {"CT01": "hosp-a", "MR02": "hosp-b"}


@pytest.mark.parametrize(("profile", "wait_ms"), [(EMBEDDED_PROFILE, 500), (PRODUCTION_PROFILE, 1500)])
async def test_worker_consumer_takes_the_fetch_wait_from_the_profile(profile: object, wait_ms: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Tansu holds an empty fetch for the whole wait: Faust's fixed 1.5 s delayed every hop.
    from streams.app import app

    monkeypatch.setattr(app, "profile", profile)
    consumer = app.consumer._thread._create_worker_consumer(app.transport)  # type: ignore[attr-defined]
    try:
        assert consumer._fetch_max_wait_ms == wait_ms
    finally:
        await consumer.stop()
