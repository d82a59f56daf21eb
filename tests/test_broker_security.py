"""Broker TLS and SASL (issue #14 item 9c): settings -> one helper -> every Kafka client.

The embedded Tansu broker speaks plaintext only, so the secured protocols are checked by
building the real clients (aiokafka's producer, consumer and admin client, and Faust's
producer and worker consumer) and reading their configuration; plaintext is then checked
end to end against the real broker.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from core.errors import ConfigError
from core.settings import EMBEDDED_PROFILE, BrokerSecurity, Settings
from dicomflow.embedded.broker import EmbeddedBroker
from feeders.publisher import EventPublisher
from streams import broker as broker_mod
from streams.broker import faust_credentials, kafka_client_kwargs, read_range

PASSWORD = "s3cr3t-hunter2"  # noqa: S105 - a test value whose absence from logs is asserted


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"DICOMFLOW_HOME": str(tmp_path / "home"), "DICOMFLOW_BROKER": "kafka://127.0.0.1:9", **extra}


def _sasl_ssl(tmp_path: Path) -> dict[str, str]:
    return _env(tmp_path, DICOMFLOW_BROKER_SECURITY_PROTOCOL="SASL_SSL",
                DICOMFLOW_BROKER_SASL_MECHANISM="SCRAM-SHA-512", DICOMFLOW_BROKER_SASL_USERNAME="dicomflow",
                DICOMFLOW_BROKER_SASL_PASSWORD=PASSWORD)


def _client_config(client: Any) -> dict[str, Any]:
    return {"security_protocol": client._security_protocol, "sasl_mechanism": client._sasl_mechanism,
            "sasl_plain_username": client._sasl_plain_username,
            "sasl_plain_password": client._sasl_plain_password, "ssl_context": client._ssl_context}


def test_settings_become_client_kwargs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env(_sasl_ssl(tmp_path))
    security = settings.broker_security
    kwargs = kafka_client_kwargs(security)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "dicomflow" and kwargs["sasl_plain_password"] == PASSWORD
    ctx = kwargs["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    # The password is a Secret: never in repr, describe() or the start-up log line.
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("settings %s %r %r", settings.describe(), settings, security)
    assert PASSWORD not in caplog.text
    assert settings.describe()["broker_security"] == "SASL_SSL SCRAM-SHA-512 user=dicomflow"
    assert kafka_client_kwargs(BrokerSecurity()) == {"security_protocol": "PLAINTEXT"}


def test_broker_ca_bundle_is_loaded(tmp_path: Path) -> None:
    # A CA bundle that does not exist is a configuration error that names the variable.
    settings = Settings.from_env(_env(tmp_path, DICOMFLOW_BROKER_SECURITY_PROTOCOL="SSL",
                                      DICOMFLOW_BROKER_SSL_CA=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError) as missing:
        kafka_client_kwargs(settings.broker_security)
    assert missing.value.field == "DICOMFLOW_BROKER_SSL_CA"


@pytest.mark.parametrize("extra, field", [
    ({"DICOMFLOW_BROKER_SECURITY_PROTOCOL": "TLS"}, "DICOMFLOW_BROKER_SECURITY_PROTOCOL"),
    ({"DICOMFLOW_BROKER_SECURITY_PROTOCOL": "SASL_SSL"}, "DICOMFLOW_BROKER_SASL_USERNAME"),
    ({"DICOMFLOW_BROKER_SECURITY_PROTOCOL": "SASL_SSL", "DICOMFLOW_BROKER_SASL_USERNAME": "u",
      "DICOMFLOW_BROKER_SASL_PASSWORD": "p", "DICOMFLOW_BROKER_SASL_MECHANISM": "GSSAPI"},
     "DICOMFLOW_BROKER_SASL_MECHANISM"),
    ({"DICOMFLOW_BROKER_SASL_USERNAME": "u"}, "DICOMFLOW_BROKER_SASL_USERNAME"),
    ({"DICOMFLOW_BROKER_SSL_CA": "ca.pem"}, "DICOMFLOW_BROKER_SSL_CA"),
])
def test_inconsistent_broker_security_is_refused(tmp_path: Path, extra: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(_env(tmp_path, **extra))
    assert refused.value.field == field


def test_the_embedded_broker_is_plaintext_only(tmp_path: Path) -> None:
    env = _sasl_ssl(tmp_path)
    del env["DICOMFLOW_BROKER"]
    with pytest.raises(ConfigError, match="plaintext"):
        Settings.from_env(env)


async def test_every_client_gets_the_security_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _sasl_ssl(tmp_path)
    security = Settings.from_env(env).broker_security
    expected = kafka_client_kwargs(security)
    wanted = {k: expected[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                       "sasl_plain_password")}

    def check(client: Any) -> None:
        got = _client_config(client)
        assert {k: got[k] for k in wanted} == wanted
        assert isinstance(got["ssl_context"], ssl.SSLContext)

    # The feeders' producer.
    publisher = EventPublisher("kafka://127.0.0.1:9", EMBEDDED_PROFILE, partitions=4, security=security)
    check(publisher.new_producer().client)
    # The short-lived clients of streams/broker.py: explicit, and from the environment by default
    # (the callers that hold only a bootstrap string: gap recovery, lag, status, the relay).
    check(broker_mod.new_consumer("127.0.0.1:9", None, security)._client)
    check(broker_mod.new_admin("127.0.0.1:9", 1.0, security)._client)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    check(broker_mod.new_consumer("127.0.0.1:9", "g")._client)
    check(broker_mod.new_admin("127.0.0.1:9", 1.0)._client)
    check(EventPublisher("kafka://127.0.0.1:9", EMBEDDED_PROFILE, partitions=4).new_producer().client)


async def test_the_faust_app_uses_the_same_credentials(tmp_path: Path) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from streams.app import create_app

    settings = Settings.from_env(_sasl_ssl(tmp_path))
    expected = kafka_client_kwargs(settings.broker_security)
    app = create_app(settings)
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert {k: auth[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                 "sasl_plain_password")} == \
        {k: expected[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                  "sasl_plain_password")}
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    assert PASSWORD not in repr(app.conf.broker_credentials)
    # Faust's own clients: the producer, and the worker consumer (through dicomflow's transport).
    producer = app.producer._new_producer()
    assert _client_config(producer.client)["sasl_mechanism"] == "SCRAM-SHA-512"
    assert _client_config(producer.client)["security_protocol"] == "SASL_SSL"
    consumer_thread = app.consumer._new_consumer_thread()
    worker_consumer = consumer_thread._create_worker_consumer(app.transport)
    assert _client_config(worker_consumer._client)["sasl_plain_username"] == "dicomflow"
    assert _client_config(worker_consumer._client)["security_protocol"] == "SASL_SSL"
    # And a plaintext configuration gives Faust no credentials at all.
    plain = create_app(Settings.from_env(_env(tmp_path)))
    assert credentials_to_aiokafka_auth(plain.conf.broker_credentials, plain.conf.ssl_context) == \
        {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(BrokerSecurity()) is None


@pytest.mark.integration
async def test_plaintext_still_works_end_to_end(fresh_broker: EmbeddedBroker, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMFLOW_BROKER_SECURITY_PROTOCOL", "PLAINTEXT")
    security = Settings.from_env(_env(tmp_path, DICOMFLOW_BROKER=fresh_broker.url)).broker_security
    publisher = EventPublisher(fresh_broker.url, EMBEDDED_PROFILE, partitions=4, security=security)
    await publisher.start()
    try:
        await publisher.publish_raw(b'{"probe": 1}', "k", topic="storage_queue")
    finally:
        await publisher.stop()
    records = [r for p in range(4) for r in await read_range(fresh_broker.bootstrap, "storage_queue", p, None, None)]
    assert [r.value for r in records] == [b'{"probe": 1}']
    consumer = AIOKafkaConsumer(bootstrap_servers=fresh_broker.bootstrap, **kafka_client_kwargs(security))
    await consumer.start()
    try:
        assert "storage_queue" in await consumer.topics()
    finally:
        await consumer.stop()
