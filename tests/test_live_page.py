"""The live page (`/` on the worker's web port) in a real browser: headless Chromium from Debian,
driven over the Chrome DevTools protocol, loads the page while a backfill runs; what the page
shows must equal `dicomflow status --json`. Screenshots are kept under the test's tmp path (printed).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.live_page import JSON_STALE_SERIES, CounterRing, DeadLetterTail
from agents.live_view import render_body
from dicomflow.embedded.broker import EmbeddedBroker
from streams.metrics import FlushWatch
from tests.doris_emulator import DorisEmulator
from tests.fixtures_doris import DORIS_DB, DORIS_PASSWORD, DORIS_USER
from tests.harness import REPO, WorkerProcess, clone_series, worker_env

CHROMIUM = "/usr/bin/chromium"
#: Screenshots outlive pytest's rotating tmp directories here (ignored by git).
ARTIFACTS = REPO / "tests" / "artifacts"
SERIES, INSTANCES, JUNK = 4, 60, 2


class Browser:
    """Headless Chromium and one page, over the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def start(self) -> Browser:
        assert shutil.which(CHROMIUM) or shutil.which("chromium"), "chromium is not installed (Debian: chromium)"
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [shutil.which(CHROMIUM) or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-extensions", "--window-size=1400,1300", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        await self.call("Page.enable")
        return self

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), timeout=30)
            if msg.get("id") == msg_id:
                assert "error" not in msg, msg
                return dict(msg.get("result", {}))
            self.events.append(msg)

    async def navigate(self, url: str) -> None:
        self.events.clear()
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            assert time.monotonic() < deadline, "page did not load"
            await self.evaluate("1")

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


#: What the page shows, read from its DOM (the cells' data attributes and classes).
READ_PAGE = """JSON.stringify({
  generated: Number(document.querySelector('#snapshot').dataset.generated),
  totalLag: Number(document.querySelector('#total-lag').textContent.replace(/,/g, '')),
  lag: [...document.querySelectorAll('tr[data-topic]')].map(tr => ({
    topic: tr.dataset.topic, partition: Number(tr.dataset.partition),
    end: tr.querySelector('.end').textContent, committed: tr.querySelector('.committed').textContent,
    lag: tr.querySelector('.lag').textContent})),
  letters: [...document.querySelectorAll('tr[data-code]')].map(tr => ({
    topic: tr.dataset.dlq, code: tr.dataset.code, n: tr.querySelector('.n').textContent})),
  lastLetters: document.querySelectorAll('tr.letter').length,
  sinks: [...document.querySelectorAll('tr[data-sink]')].map(tr => ({
    sink: tr.dataset.sink, batches: tr.querySelector('.batches').textContent,
    rows: tr.querySelector('.rows').textContent, rejected: tr.querySelector('.rejected').textContent,
    retries: tr.querySelector('.retries').textContent})),
  stages: Object.fromEntries([...document.querySelectorAll('[data-stage]')].map(
    d => [d.dataset.stage, d.querySelector('.total').textContent])),
  jsonStale: document.querySelector('#json-stale .big').textContent,
  stale: document.body.classList.contains('stale'),
})"""


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _page_view(page: dict[str, Any]) -> dict[str, Any]:
    """The page's figures in the shape of `status --json`."""
    topics: dict[str, list[dict[str, Any]]] = {}
    for row in page["lag"]:
        entry: dict[str, Any] = {"partition": row["partition"], "end_offset": int(row["end"])}
        if row["lag"] != "":
            entry["committed_offset"] = int(row["committed"]) if row["committed"] else None
            entry["lag"] = int(row["lag"])
        topics.setdefault(row["topic"], []).append(entry)
    letters: dict[str, dict[str, int]] = {}
    for row in page["letters"]:
        letters.setdefault(row["topic"], {})[row["code"]] = int(row["n"])
    sinks = {s["sink"]: {k: _num(s[k]) for k in ("batches", "rows", "rejected", "retries")} for s in page["sinks"]}
    return {"topics": topics, "total_lag": page["totalLag"], "dead_letters": letters, "sinks": sinks}


def _status_view(report: dict[str, Any]) -> dict[str, Any]:
    sinks = {name: {k: v[k] for k in ("batches", "rows", "rejected", "retries")}
             for name, v in report["sinks"].items() if "batches" in v}
    letters = {topic: codes for topic, codes in report["dead_letters"].items() if codes}
    return {"topics": report["topics"], "total_lag": report["total_lag"], "dead_letters": letters, "sinks": sinks}


async def _status(env: dict[str, str]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "dicomflow.cli", "status", "--json", env=env,
                                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return dict(orjson.loads(out))


async def _indexed(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT series_related_instances FROM dicom_state_meta WHERE tenant_id = 't-live'")
    except asyncpg.UndefinedTableError:
        rows = []
    finally:
        await conn.close()
    return sorted(r["series_related_instances"] for r in rows)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310 - loopback
        return str(resp.read().decode())


def _web_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/live.json", timeout=2) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.mark.integration
async def test_live_page_in_chromium_matches_status(fresh_broker: EmbeddedBroker, tmp_path: Path, ct_small: Path,
                                                    pg_dsn: str, doris_emulator: DorisEmulator) -> None:
    home = tmp_path / "home"
    clone_series(ct_small, home / "storage" / "run", series=SERIES, instances=INSTANCES)
    for i in range(JUNK):
        (home / "storage" / "run" / f"junk{i}.dcm").write_text("not dicom")
    total = SERIES * INSTANCES + JUNK
    env = worker_env(fresh_broker.url, home, DICOMFLOW_POSTGRES_DSN=pg_dsn,
                     DICOMFLOW_DORIS_FE_URL=doris_emulator.fe_url, DICOMFLOW_DORIS_USER=DORIS_USER,
                     DICOMFLOW_DORIS_PASSWORD=DORIS_PASSWORD, DICOMFLOW_DORIS_DATABASE=DORIS_DB,
                     DICOMFLOW_DORIS_MAX_INTERVAL="0.5")
    port = int(env["DICOMFLOW_WEB_PORT"])
    worker = WorkerProcess(env, home / "worker.log").start()
    browser = Browser(tmp_path / "chromium")
    backfill: asyncio.subprocess.Process | None = None
    try:
        deadline = time.monotonic() + 90
        while not await asyncio.to_thread(_web_up, port):
            assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(0.3)
        ARTIFACTS.mkdir(exist_ok=True)
        for old in ARTIFACTS.glob("live_page*.png"):
            old.unlink()
        t0 = time.monotonic()
        await browser.start()
        await browser.navigate(f"http://127.0.0.1:{port}/?refresh=1")
        first = orjson.loads(await browser.evaluate(READ_PAGE))
        assert first["lag"] and {r["topic"] for r in first["lag"]} >= {"storage_queue", "log_queue"}

        # The backfill runs while the page is open; the page refreshes itself (no navigation).
        backfill = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dicomflow.cli", "backfill", str(home / "storage" / "run"), "--tenant", "t-live",
            "--no-progress", env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen: list[dict[str, Any]] = []
        mid_shot: Path | None = None
        deadline = time.monotonic() + 120
        while True:
            page = orjson.loads(await browser.evaluate(READ_PAGE))
            if not seen or page["generated"] != seen[-1]["generated"]:
                seen.append(page)
            if mid_shot is None and len(seen) >= 2 and 0 < _num(page["stages"]["ingest"]) < total:
                mid_shot = await browser.screenshot(ARTIFACTS / "live_page_during_backfill.png")
            if backfill.returncode is not None and _num(page["stages"]["ingest"]) >= total:
                break
            assert time.monotonic() < deadline, (seen[-1], worker.log_tail())
            try:
                await asyncio.wait_for(backfill.wait(), timeout=0.5)
            except TimeoutError:
                pass
        out = (await backfill.stdout.read()).decode() if backfill.stdout else ""
        assert backfill.returncode == 0, out
        assert len(seen) >= 3, "the page did not refresh itself while the backfill ran"
        assert _num(seen[0]["stages"]["ingest"]) < total <= _num(seen[-1]["stages"]["ingest"])
        assert not seen[-1]["stale"]

        t1 = time.monotonic()
        # Once the pipeline is still, the page and `status --json` must show the same figures.
        deadline = time.monotonic() + 120
        while True:
            before = await _status(env)
            settled = (before["total_lag"] == 0 and await _indexed(pg_dsn) == [INSTANCES] * SERIES
                       and sum(p["end_offset"] for p in before["topics"]["storage_queue"]) == total)
            if settled:
                # A page rendered after this status (its cache lives 2 s, it refreshes every second).
                asked = time.time()
                while (page := orjson.loads(await browser.evaluate(READ_PAGE)))["generated"] <= asked:
                    assert time.monotonic() < deadline, "the page stopped refreshing"
                    await asyncio.sleep(0.3)
                after = await _status(env)
                if _status_view(before) == _status_view(after):
                    metrics = await asyncio.to_thread(_scrape, port)
                    break
            assert time.monotonic() < deadline, (before, worker.log_tail())
            await asyncio.sleep(1)
        shot = await browser.screenshot(ARTIFACTS / "live_page.png")
        print(f"\nlive page screenshots: {shot} {mid_shot or '(none during the backfill)'}; backfill seen in "
              f"{t1 - t0:.1f} s, settled in {time.monotonic() - t1:.1f} s")
    finally:
        if backfill is not None and backfill.returncode is None:
            backfill.kill()
            await backfill.wait()
        await browser.stop()
        worker.stop()

    assert _page_view(page) == _status_view(after)
    assert after["dead_letters"]["storage_queue_dlq"] == {"NOT_DICOM": JUNK}
    assert page["lastLetters"] == JUNK
    # Single worker on a fresh broker: what it received is what the topic holds.
    assert _num(page["stages"]["ingest"]) == total
    stale = [f.samples[0].value for f in text_string_to_metric_families(metrics) if f.name == JSON_STALE_SERIES]
    assert page["jsonStale"] == (f"{int(stale[0]):,}" if stale else "n/a")
    assert shot.stat().st_size > 10_000


def _snap(**over: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "generated_at": 1.0, "worker": "w", "group": "g", "broker": "kafka://b:1", "broker_error": None,
        "topics": {"storage_queue": [{"partition": 0, "end_offset": 5, "committed_offset": 3, "lag": 2}]},
        "total_lag": 2, "rates": {"step_s": 5.0, "span_s": 900.0, "stages": {}, "totals": {"ingest": 5.0}},
        "dead_letters": {"storage_queue_dlq": {"NOT_DICOM": 1}}, "dead_letters_complete": True,
        "last_dead_letters": [], "sinks": {},
        "series": {"windows_open": 0.0, "flushes": 0.0, "instances": 0.0, "window_seconds": 5.0,
                   "last_flush_age_seconds": 1.0, "flush_wait_seconds": 0.0},
        "json": {"stale_series": None, "oldest_stale_seconds": None},
    }
    snap.update(over)
    return snap


def test_dead_letter_content_is_escaped() -> None:
    tail = DeadLetterTail(("storage_queue_dlq",))
    letter = {"error": {"code": "NOT_DICOM", "field": "file_path", "message": "<img src=x onerror=alert(1)>"},
              "stage": "ingest", "time": "t", "original": {"tenant_id": "t1", "trace_id": "\"><script>x()</script>",
                                                           "file_path": "a/<b>.dcm"}}
    tail._take("storage_queue_dlq", 0, 7, orjson.dumps(letter), 1.0)
    tail._take("storage_queue_dlq", 0, 8, b"not json", 2.0)
    assert dict(tail.counts["storage_queue_dlq"]) == {"NOT_DICOM": 1, "UNDECODABLE": 1}
    body = render_body(_snap(last_dead_letters=list(reversed(tail.recent))))
    assert "<script>" not in body and "<img" not in body and "<b>.dcm" not in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body and "a/&lt;b&gt;.dcm" in body


def test_last_letters_keep_the_ten_newest() -> None:
    tail = DeadLetterTail(("storage_queue_dlq",))
    for i in range(25):
        tail._take("storage_queue_dlq", i % 4, i, orjson.dumps({"error": {"code": f"C{i}"}}), float(i))
    assert [r["code"] for r in tail.recent] == [f"C{i}" for i in range(15, 25)]
    assert sum(tail.counts["storage_queue_dlq"].values()) == 25


def test_counter_ring_rates() -> None:
    ring = CounterRing(step_s=5.0, span_s=30.0)
    assert ring.add(100.0, {"ingest": 0.0})
    assert not ring.add(102.0, {"ingest": 50.0})  # within a step: not kept
    assert ring.add(105.0, {"ingest": 50.0})
    assert ring.add(110.0, {"ingest": 50.0})
    assert ring.add(115.0, {"ingest": 20.0})  # counter reset (a restarted sink): counts from zero
    for t in range(120, 200, 5):
        ring.add(float(t), {"ingest": 20.0})
    assert len(ring.samples) == 7  # 30 s span at 5 s steps
    rates = ring.rates(195.0)["ingest"]
    assert all(r == 0.0 for _, r in rates)
    ring2 = CounterRing(step_s=5.0, span_s=900.0)
    for t, v in ((0.0, 0.0), (5.0, 50.0), (10.0, 50.0), (15.0, 20.0)):
        ring2.add(t, {"ingest": v})
    assert ring2.rates(15.0)["ingest"] == [(10.0, 10.0), (5.0, 0.0), (0.0, 4.0)]


def test_flush_watch() -> None:
    watch = FlushWatch(now=0.0)
    watch.observe(flushes=0, windows_open=0, now=1.0)
    assert watch.wait_s(1.0) == 0.0
    watch.observe(flushes=0, windows_open=2, now=10.0)  # instances arrive
    assert watch.wait_s(25.0) == 15.0
    watch.observe(flushes=1, windows_open=1, now=30.0)  # a flush; the next window already holds instances
    assert watch.last_flush == 30.0 and watch.wait_s(31.0) == 1.0
    watch.observe(flushes=2, windows_open=0, now=40.0)
    assert watch.wait_s(100.0) == 0.0 and watch.last_flush == 40.0
    watch.observe(flushes=2, windows_open=1, now=3600.0)  # after an idle hour, one instance
    assert watch.wait_s(3601.0) == 1.0


async def test_page_answers_at_root_and_says_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    """`/` is the live page (ahead of Faust's index, mounted there too), and a broker that cannot be
    read gives a page that says so, not an error."""
    from aiohttp.test_utils import TestClient, TestServer

    from core.settings import Settings
    from dicomflow.embedded.ports import free_port
    from streams.app import create_app

    env = {"DICOMFLOW_HOME": str(tmp_path), "DICOMFLOW_BROKER": f"kafka://127.0.0.1:{free_port()}",
           "DICOMFLOW_WORKER_ID": "w-<unreachable>"}
    app = create_app(Settings.from_env(env))
    app.web.init_server()  # applies Faust's blueprints too, as the worker does
    async with TestClient(TestServer(app.web.web_app)) as client:  # type: ignore[attr-defined]
        resp = await client.get("/")
        text = await resp.text()
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html"), text
        assert "dicomflow live" in text and "Broker not readable" in text and "w-&lt;unreachable&gt;" in text
        data = await (await client.get("/live.json")).json()
        assert data["broker_error"] and data["worker"] == "w-<unreachable>"
        assert data["series"]["window_seconds"] == 5.0
        body = await (await client.get("/live.html")).text()
        assert body.startswith('<div id="snapshot"')
