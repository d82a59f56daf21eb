"""HTML of the live page: pure functions from the snapshot (agents/live_page.py) to markup.

Server-rendered, charts as inline SVG; the shell (style, the few lines of script that poll
``live.html``) is ``agents/live_assets/page.html``, shipped as package data. Everything that
comes from data (dead letters carry whatever a feeder sent) goes through :func:`html.escape`.
Cells carry ``data-*`` attributes and classes so scripts and tests can read the values.
"""

from __future__ import annotations

import html
import time
from functools import cache
from importlib import resources
from string import Template
from typing import Any

__all__ = ["render_page", "render_body", "sparkline"]


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _n(value: Any) -> str:
    """A count as an integer, a rate or duration with one decimal, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@cache
def _shell() -> Template:
    return Template(resources.files("agents").joinpath("live_assets/page.html").read_text(encoding="utf-8"))


def render_page(snap: dict[str, Any]) -> str:
    return _shell().substitute(title=_e(f"dicomflow live · {snap['worker']}"), body=render_body(snap))


def sparkline(points: list[list[float]], span_s: float, *, width: int = 300, height: int = 56) -> str:
    """Events per second as an SVG area chart: x is time (``span_s`` ago .. now), y from 0 to the peak."""
    peak = max((r for _, r in points), default=0.0)
    top = peak if peak > 0 else 1.0
    coords = [(width * (1 - min(ago, span_s) / span_s), height - 2 - (height - 4) * r / top) for ago, r in points]
    coords.sort()
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    area = f"{coords[0][0]:.1f},{height} {line} {coords[-1][0]:.1f},{height}" if coords else ""
    return (f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="events per second, peak {peak:.1f}">'
            f'<line x1="0" y1="{height - 1}" x2="{width}" y2="{height - 1}" class="axis"/>'
            + (f'<polygon points="{area}" class="area"/><polyline points="{line}" class="line"/>' if coords else
               f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">collecting…</text>')
            + f'<text x="2" y="11" class="peak">peak {_n(round(peak, 1))}/s</text>'
            f'<text x="2" y="{height - 4}" class="muted">−{span_s / 60:.0f} min</text></svg>')


def _lag(snap: dict[str, Any]) -> str:
    rows = []
    for topic, parts in sorted(snap["topics"].items()):
        consumed = any("lag" in p for p in parts)
        topic_lag = sum(p.get("lag", 0) for p in parts)
        for i, p in enumerate(parts):
            lag = p.get("lag")
            first = (f'<th rowspan="{len(parts)}" scope="rowgroup">{_e(topic)}'
                     f'<div class="muted">{"lag " + _n(topic_lag) if consumed else "not consumed"}</div></th>'
                     if i == 0 else "")
            cls = ' class="behind"' if lag else ""
            rows.append(f'<tr data-topic="{_e(topic)}" data-partition="{p["partition"]}"{cls}>{first}'
                        f'<td>{p["partition"]}</td><td class="end">{p["end_offset"]}</td>'
                        f'<td class="committed">{_e(p.get("committed_offset", ""))}</td>'
                        f'<td class="lag">{"" if lag is None else lag}</td></tr>')
    return ('<section id="lag"><h2>Lag <span class="big" id="total-lag">'
            f'{_n(snap["total_lag"])}</span></h2><table><thead><tr><th>topic</th><th>partition</th>'
            '<th>end offset</th><th>committed</th><th>lag</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></section>")


def _rates(snap: dict[str, Any]) -> str:
    rates = snap["rates"]
    cards = []
    for stage, total in rates["totals"].items():
        points = rates["stages"].get(stage, [])
        now = points[-1][1] if points else 0.0
        cards.append(f'<div class="card" data-stage="{_e(stage)}"><div class="name">{_e(stage)}</div>'
                     f'<div><span class="big rate">{_n(round(now, 1))}</span>/s '
                     f'<span class="muted">total <span class="total">{_n(total)}</span></span></div>'
                     f'{sparkline(points, rates["span_s"], width=240)}</div>')
    return ('<section id="rates"><h2>Events per second, last 15 minutes <span class="muted">(this worker; ingest '
            'and series: records received, sinks: rows written)</span></h2><div class="cards">'
            + "".join(cards) + "</div></section>")


def _letters(snap: dict[str, Any]) -> str:
    rows = []
    for topic, codes in sorted(snap["dead_letters"].items()):
        if not codes:
            rows.append(f'<tr data-dlq="{_e(topic)}"><td>{_e(topic)}</td><td class="muted">none</td><td></td></tr>')
        for code, n in codes.items():
            rows.append(f'<tr data-dlq="{_e(topic)}" data-code="{_e(code)}"><td>{_e(topic)}</td>'
                        f'<td class="code">{_e(code)}</td><td class="n">{n}</td></tr>')
    counting = "" if snap["dead_letters_complete"] else ' <span class="muted">(still counting…)</span>'
    last = "".join(
        f'<tr class="letter"><td>{_e(r["time"])}</td><td>{_e(r["topic"])}:{r["partition"]}@{r["offset"]}</td>'
        f'<td class="code">{_e(r["code"])}</td><td>{_e(r["field"])}</td><td>{_e(r["stage"])}</td>'
        f'<td>{_e(r["tenant"])}</td><td class="mono">{_e(r["trace_id"])}</td>'
        f'<td class="mono wrap">{_e(r["file_path"])}</td><td class="wrap">{_e(r["message"])}</td></tr>'
        for r in snap["last_dead_letters"])
    return ('<section id="dead-letters"><h2>Dead letters' + counting + '</h2><table class="codes"><thead><tr>'
            '<th>topic</th><th>code</th><th>letters</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
            '<h3>Last ten</h3><table class="last"><thead><tr><th>time</th><th>where</th><th>code</th><th>field</th>'
            '<th>stage</th><th>tenant</th><th>trace id</th><th>file</th><th>reason</th></tr></thead><tbody>'
            + (last or '<tr><td colspan="9" class="muted">none</td></tr>') + "</tbody></table>"
            '<p class="muted">Browse them with <code>dicomflow dlq list</code>; replay with '
            "<code>dicomflow replay-dlq</code>.</p></section>")


_SINK_COLUMNS = (("batches", "batches"), ("rows", "rows"), ("rejected", "rejected"),
                 ("retries", "failed tries"), ("loads", "loads"), ("load_errors", "load errors"),
                 ("unexpected_errors", "unexpected"))


def _sinks(snap: dict[str, Any]) -> str:
    rows = []
    for name, c in snap["sinks"].items():
        batches = c.get("batches", 0.0)
        mean_ms = 1000 * c.get("latency_seconds", 0.0) / batches if batches else None
        failing = ' class="behind"' if c.get("retries") else ""
        cells = "".join(f'<td class="{key}">{"–" if key not in c else _n(c[key])}</td>' for key, _ in _SINK_COLUMNS)
        fails = {k[5:]: v for k, v in c.items() if k.startswith("fail_") and v}
        kinds = ", ".join(f"{k} {_n(v)}" for k, v in sorted(fails.items()))
        rows.append(f'<tr data-sink="{_e(name)}"{failing}><th scope="row">{_e(name)}</th>{cells}'
                    f'<td class="latency">{_n(None if mean_ms is None else round(mean_ms, 1))}</td>'
                    f'<td class="kinds">{_e(kinds)}</td></tr>')
    head = "".join(f"<th>{_e(title)}</th>" for _, title in _SINK_COLUMNS)
    return ('<section id="sinks"><h2>Sinks <span class="muted">(this worker)</span></h2><table><thead><tr><th>sink</th>'
            + head + "<th>ms/batch</th><th>failures by kind</th></tr></thead><tbody>"
            + ("".join(rows) or '<tr><td colspan="10" class="muted">no sink configured</td></tr>')
            + "</tbody></table></section>")


def _windows(snap: dict[str, Any]) -> str:
    s, j = snap["series"], snap["json"]
    items = (("windows-open", "series windows open", _n(s["windows_open"])),
             ("window", "window", _age(s["window_seconds"])),
             ("flushes", "flushes", _n(s["flushes"])),
             ("instances", "instances", _n(s["instances"])),
             ("last-flush", "last flush", _age(s["last_flush_age_seconds"]) + " ago"),
             ("flush-wait", "waiting for a flush", _age(s["flush_wait_seconds"])),
             ("json-stale", "JSON documents stale (series)", _n(j["stale_series"])),
             ("json-oldest", "oldest stale JSON", _age(j["oldest_stale_seconds"])))
    cells = "".join(f'<div class="stat" id="{k}"><div class="muted">{_e(title)}</div>'
                    f'<div class="big">{_e(v)}</div></div>' for k, title, v in items)
    return f'<section id="windows"><h2>Series windows and JSON</h2><div class="stats">{cells}</div></section>'


def render_body(snap: dict[str, Any]) -> str:
    """The part of the page that refreshes (``/live.html``)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(snap["generated_at"]))
    error = (f'<p class="error">Broker not readable: {_e(snap["broker_error"])} (lag and dead letters are the last '
             "known)</p>" if snap["broker_error"] else "")
    return (f'<div id="snapshot" data-generated="{snap["generated_at"]:.3f}">'
            f'<header><h1>dicomflow live</h1><div class="muted">worker <b>{_e(snap["worker"])}</b> · group '
            f'{_e(snap["group"])} · broker {_e(snap["broker"])} · updated <span id="updated">{stamp}</span></div>'
            f'</header>{error}<div class="grid"><div>{_lag(snap)}</div><div>{_rates(snap)}{_windows(snap)}'
            f"{_sinks(snap)}</div></div>{_letters(snap)}</div>")
