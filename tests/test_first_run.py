"""The first run, as the README shows it (#18 item 7).

`dicomflow up` at its defaults, then the README's own `dicomflow send ./folder --aet DICOMFLOW`
and `dicomflow backfill DIR`: the embedded stack takes unmapped local callers into the default
tenant that `up` prints. A production SCP (an external broker) still rejects them, and `send`
stops at the first permanent rejection with one line naming the cause and the variable to set.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from pathlib import Path

import asyncpg
import pydicom
import pytest
from click.testing import CliRunner

from core.settings import Settings
from dicomflow.cli import main as cli_main
from dicomflow.tools.scu import send_paths
from feeders.journal import JournalPublisher
from feeders.scp import ScpConfig, StorageSCP
from feeders.tenancy import EMBEDDED_DEFAULT_TENANT
from tests.harness import REPO, clone_series
from tests.support.up import UpProcess

pytestmark = pytest.mark.integration

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomflow.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)



def _non_loopback_address() -> str:
    """An IPv4 address of this machine that is not loopback (connecting to it is not "local")."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
            address = str(s.getsockname()[0])
        except OSError:
            return ""
    return "" if address.startswith("127.") else address

async def test_up_at_defaults_accepts_readme_send_and_backfill(tmp_path: Path, ct_small: Path) -> None:
    # Defaults: no tenant variable at all (UpProcess only moves the ports and the home).
    up = UpProcess(tmp_path, DICOMFLOW_DEFAULT_TENANT="")
    await up.start()
    try:
        assert f"tenant      {EMBEDDED_DEFAULT_TENANT}" in up.text(), up.text()
        folder = tmp_path / "folder"
        clone_series(ct_small, folder, series=1, instances=3)
        sent = await asyncio.to_thread(_cli, up.env, "send", str(folder), "--aet", "DICOMFLOW", "--no-progress")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "SendSummary(" not in sent.stdout
        assert "succeeded" in sent.stdout and "3" in sent.stdout.split("succeeded", 1)[1].splitlines()[0]
        stored = list((up.home / "storage" / EMBEDDED_DEFAULT_TENANT).rglob("*.dcm"))
        assert len(stored) == 3, sent.stdout

        old = up.home / "storage" / "old"
        clone_series(ct_small, old, series=1, instances=2)
        filled = await asyncio.to_thread(_cli, up.env, "backfill", str(old), "--no-progress")
        assert filled.returncode == 0, filled.stdout + filled.stderr
        assert "published=2" in filled.stdout

        # Both reach the series index under the default tenant.
        await up.wait_counts([2, 3], timeout=120)
        conn = await asyncpg.connect((up.home / "postgres.dsn").read_text())
        try:
            tenants = {r["tenant_id"] for r in await conn.fetch("SELECT tenant_id FROM dicom_state_meta")}
        finally:
            await conn.close()
        assert tenants == {EMBEDDED_DEFAULT_TENANT}
    finally:
        up.terminate()


def test_production_scp_rejects_and_send_stops_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A production SCP: an external broker, no tenant maps, no default tenant.
    settings = Settings.from_env({"DICOMFLOW_HOME": str(tmp_path / "home"), "DICOMFLOW_BROKER": "kafka://127.0.0.1:9"})
    config = ScpConfig.from_settings(settings, host="127.0.0.1", port=0)
    assert config.tenancy.default_tenant is None
    loop = asyncio.new_event_loop()
    scp = StorageSCP(config, JournalPublisher(tmp_path / "journal", "scp"))
    scp.start(loop=loop)
    try:
        folder = tmp_path / "folder"
        clone_series(TEST_FILES / "CT_small.dcm", folder / "ct", series=1, instances=3)
        clone_series(TEST_FILES / "MR_small.dcm", folder / "mr", series=1, instances=2)
        # One presentation context per association: two associations would be needed.
        monkeypatch.setattr("dicomflow.tools.scu.MAX_CONTEXTS", 1)
        caplog.set_level(logging.INFO, logger="feeders.scp.association")
        result = CliRunner().invoke(cli_main, ["send", str(folder), "--aet", "DICOMFLOW", "--port",
                                               str(scp.address[1]), "--no-progress"])
    finally:
        scp.stop(grace_s=2.0)
        loop.close()
    out = result.output
    assert result.exit_code != 0, out
    assert "SendSummary(" not in out
    rejections = [r for r in caplog.records
                  if r.name == "feeders.scp.association" and "association rejected" in r.getMessage()]
    assert len(rejections) == 1, out  # stopped at the first permanent rejection
    cause = [line for line in out.splitlines() if "Remedy" in line]
    assert len(cause) == 1, out  # one line: the cause and which variable to set
    assert "rejected" in cause[0] and "not recognised" in cause[0] and "DICOMFLOW_DEFAULT_TENANT" in cause[0] \
        and "DICOMFLOW_TENANT_BY_CALLING_AE" in cause[0], cause
    rows = {line.strip().rsplit(None, 1)[0].strip(): int(line.rsplit(None, 1)[1])
            for line in out.splitlines() if line.startswith("  ") and line.rsplit(None, 1)[-1].isdigit()}
    assert rows["succeeded"] == 0 and rows["failed"] == 5, out
    assert rows["calling AE title 'DICOMFLOW_SCU' not recognised"] == 5, out
    assert list((tmp_path / "home").rglob("*.dcm")) == []


@pytest.mark.skipif(not _non_loopback_address(), reason="this machine has no non-loopback address")
def test_the_implicit_default_tenant_takes_only_callers_on_this_machine(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    # The embedded stack's SCP listens on every address, but only callers on this machine land in
    # the tenant it picked by itself: a device on the network must be mapped (or the default set).
    settings = Settings.from_env({"DICOMFLOW_HOME": str(tmp_path / "home")})
    settings.storage_root.mkdir(parents=True)
    config = ScpConfig.from_settings(settings, host="0.0.0.0", port=0)
    assert config.tenancy.default_tenant == EMBEDDED_DEFAULT_TENANT
    loop = asyncio.new_event_loop()
    journal = JournalPublisher(tmp_path / "journal", "scp")
    loop.run_until_complete(journal.start())
    runner = threading.Thread(target=loop.run_forever, daemon=True)  # the SCP publishes on this loop
    runner.start()
    scp = StorageSCP(config, journal)
    scp.start(loop=loop)
    try:
        files = clone_series(TEST_FILES / "CT_small.dcm", tmp_path / "ct", series=1, instances=1)
        caplog.set_level(logging.INFO, logger="feeders.scp.association")
        local = send_paths(files, "127.0.0.1", scp.address[1], "DICOMFLOW")
        remote = send_paths(files, _non_loopback_address(), scp.address[1], "DICOMFLOW")
    finally:
        scp.stop(grace_s=2.0)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=10)
        loop.run_until_complete(journal.stop())
        loop.close()
    assert local.succeeded == 1, local
    assert remote.succeeded == 0, remote
    rejected = [r.getMessage() for r in caplog.records if "association rejected" in r.getMessage()]
    assert len(rejected) == 1 and "reason=unmapped_remote_caller" in rejected[0], rejected
    # with the default tenant configured explicitly, the network is welcome too
    explicit = Settings.from_env({"DICOMFLOW_HOME": str(tmp_path / "home"), "DICOMFLOW_DEFAULT_TENANT": "site"})
    assert ScpConfig.from_settings(explicit, host="0.0.0.0", port=0).tenancy.for_association(
        "ANY", "DICOMFLOW", local=False) is not None
