"""`dicomflow tail TOPIC`, and the kcat command lines docs/operations.md gives for it, checked
against the embedded (Tansu) broker: both print the same records, line for line."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from core.settings import EMBEDDED_PROFILE
from dicomflow.embedded.broker import EmbeddedBroker
from feeders.publisher import EventPublisher
from streams.broker import ensure_topics
from streams.topology import ALL_TOPICS, STORAGE
from tests.harness import REPO, worker_env

pytestmark = pytest.mark.integration

#: The format docs/operations.md gives kcat, so that its lines are dicomflow tail's.
KCAT_FORMAT = "%t p%p @%o key=%k %s\\n"
KEYS = ["t1/1.2/3.1", "t1/1.2/3.2", "t2/9.8/7.6"]
TAIL_SECTION = "## Watching a topic"


def _docs_kcat_lines() -> list[str]:
    """The kcat command lines of docs/operations.md's tail section (a test of the docs as written)."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split(TAIL_SECTION, 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.strip().startswith("kcat ")]


def _tail(env: dict[str, str], *args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "tail", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _librdkafka_of_kcat() -> tuple[int, ...]:
    assert shutil.which("kcat"), "kcat (Debian package kafkacat) is not installed; .ci/run installs it"
    version = subprocess.run(["kcat", "-V"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"librdkafka (\d+)\.(\d+)\.(\d+)", version)
    assert match, version
    return tuple(int(n) for n in match.groups())


def _newer_librdkafka(tmp_path: Path) -> dict[str, str]:
    """An environment that runs kcat on the librdkafka of the confluent-kafka wheel (a test
    dependency): the documented workaround for Debian 12's librdkafka 2.0.2."""
    import confluent_kafka

    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    [lib] = libs.glob("librdkafka*.so.1")
    (tmp_path / "lib").mkdir(exist_ok=True)
    (tmp_path / "lib" / "librdkafka.so.1").symlink_to(lib)
    return dict(os.environ, LD_LIBRARY_PATH=str(tmp_path / "lib"))


def _kcat(command: str, bootstrap: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A documented kcat line, with the documented broker address replaced by the test broker's."""
    # -e: stop at the end, so the comparison has an end (the docs' lines follow without it).
    line = command.replace("127.0.0.1:19092", bootstrap).replace("kcat -C", "kcat -C -e -q", 1)
    return subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.fixture
async def topic_with_records(fresh_broker: EmbeddedBroker) -> EmbeddedBroker:
    await ensure_topics(fresh_broker.bootstrap, ALL_TOPICS, 4)
    publisher = EventPublisher(fresh_broker.url, EMBEDDED_PROFILE, partitions=4)
    await publisher.start()
    try:
        for i in range(9):
            key = KEYS[i % len(KEYS)]
            await publisher.publish({"tenant_id": key.split("/")[0], "file_path": f"f/{i}.dcm", "trace_id": f"t-{i}"},
                                    key)
    finally:
        await publisher.stop()
    return fresh_broker


async def test_tail_and_the_documented_kcat_lines_agree(topic_with_records: EmbeddedBroker, tmp_path: Path) -> None:
    broker = topic_with_records
    env = worker_env(broker.url, tmp_path / "home")
    documented = _docs_kcat_lines()
    assert len(documented) >= 3, documented

    every = await asyncio.to_thread(_tail, env, STORAGE, "--from-beginning", "--exit")
    assert len(every) == 9
    assert all(line.startswith(f"{STORAGE} p") and " key=" in line for line in every)
    assert orjson.loads(every[0].split(" ", 4)[4])["trace_id"].startswith("t-")

    partition = every[0].split()[1].removeprefix("p")
    one_partition = await asyncio.to_thread(_tail, env, STORAGE, "--from-beginning", "--exit", "--partition",
                                            partition)
    assert one_partition == [line for line in every if line.split()[1] == f"p{partition}"]
    one_key = await asyncio.to_thread(_tail, env, STORAGE, "--from-beginning", "--exit", "--key", KEYS[1])
    assert len(one_key) == 3 and all(f"key={KEYS[1]} " in line for line in one_key)

    # Debian 12's kcat links librdkafka 2.0.2, which misreads the tagged fields of Tansu's
    # ApiVersions v3 answer (fixed in librdkafka 2.1.1): docs/operations.md says so and gives the
    # workaround. When a fixed kcat is installed this expectation fails: update the docs then.
    env = None
    if _librdkafka_of_kcat() < (2, 1, 1):
        plain = await asyncio.to_thread(subprocess.run, ["kcat", "-C", "-e", "-b", broker.bootstrap, "-t", STORAGE],
                                        capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0 and "ApiVersionRequest failed: Local: Read underflow" in plain.stderr, \
            plain.stderr
        env = _newer_librdkafka(tmp_path)

    # Each documented kcat line, with this test's values, prints what the matching tail printed.
    wanted = {"-o beginning -f": every, "-p PARTITION": one_partition, "KEY": one_key}
    for command in documented:
        if "-o end" in command:
            continue  # the live form: checked below through `tail` itself
        concrete = command.replace("PARTITION", partition).replace("KEY", KEYS[1]).replace("TOPIC", STORAGE)
        proc = await asyncio.to_thread(_kcat, concrete, broker.bootstrap, env)
        assert proc.returncode == 0, f"{concrete}: {proc.stderr}"
        expected = next(v for marker, v in reversed(wanted.items()) if marker in command)
        assert sorted(proc.stdout.splitlines()) == sorted(expected), (command, proc.stdout, expected)


async def test_tail_prints_records_as_they_arrive(topic_with_records: EmbeddedBroker, tmp_path: Path) -> None:
    broker = topic_with_records
    env = worker_env(broker.url, tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-m", "dicomflow.cli", "tail", STORAGE, "--count", "2", "--json"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    publisher = EventPublisher(broker.url, EMBEDDED_PROFILE, partitions=4)
    await publisher.start()
    try:
        # tail starts at the end: publish until it has printed two new records (it exits then).
        deadline = time.monotonic() + 40
        n = 0
        while proc.poll() is None:
            assert time.monotonic() < deadline, "tail printed nothing new"
            await publisher.publish({"tenant_id": "t9", "file_path": f"new/{n}.dcm", "trace_id": f"new-{n}"}, None)
            n += 1
            await asyncio.sleep(0.3)
    finally:
        await publisher.stop()
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    docs = [orjson.loads(line) for line in out.splitlines()]
    assert len(docs) == 2 and all(d["topic"] == STORAGE and d["value"]["trace_id"].startswith("new-") for d in docs)
