"""The stages. Each module registers its agents, timers and tables through ``register(app, settings)``.

:func:`register_all` is called by ``streams.app.create_app``; nothing registers at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings
    from streams.app import DicomflowApp

__all__ = ["register_all"]


def register_all(app: DicomflowApp, settings: Settings) -> None:
    from agents import doris_sink, ingest, live_page, monitoring, postgres_sink, series

    # series before ingest: with an index, ingest feeds the series windows in-process.
    for stage in (series, ingest, postgres_sink, doris_sink, monitoring, live_page):
        stage.register(app, settings)
    from agents import series_json  # issue #16: series JSON documents (and their web views)

    series_json.register(app, settings)
