"""The sink stages register from settings and the topology alone (no worker, no I/O)."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from streams.app import create_app
from streams.topology import DORIS_OUTPUTS


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"DICOMFLOW_HOME": str(tmp_path), "DICOMFLOW_BROKER": "kafka://127.0.0.1:9", **env})


def test_every_doris_output_gets_an_agent_and_each_sink_is_started_with_the_worker(tmp_path: Path) -> None:
    app = create_app(settings(tmp_path, DICOMFLOW_DORIS_FE_URL="http://127.0.0.1:9",
                              DICOMFLOW_POSTGRES_DSN="postgresql://u@127.0.0.1:9/db"))
    names = {agent.name for agent in app.agents.values()}
    kinds = [spec.doris_kind for spec in DORIS_OUTPUTS]
    assert {f"doris_{kind}" for kind in kinds} | {"postgres_sink"} <= names
    for kind in kinds:
        assert {f"doris_{kind}", f"doris_{kind}_stage", f"doris_{kind}_gaps"} <= set(app.metrics.stages)
    assert "postgres" in app.metrics.stages
    assert len(app.starters) >= len(kinds) + 1  # each sink's start() runs at worker start


def test_sinks_are_off_without_their_settings(tmp_path: Path) -> None:
    app = create_app(settings(tmp_path))
    names = {agent.name for agent in app.agents.values()}
    assert not any(n.startswith("doris_") or n == "postgres_sink" for n in names)
    assert not any(s.startswith("doris_") or s == "postgres" for s in app.metrics.stages)
