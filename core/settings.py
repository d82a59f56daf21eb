"""Settings: the only place dicomflow reads the environment.

Every value is passed on explicitly from here into constructors. Secrets (the
PostgreSQL DSN's password, the Doris password) are held as :class:`Secret` so that
``repr``/logging never shows them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from core.errors import ConfigError

__all__ = ["Secret", "Settings", "mask_dsn", "child_env", "BrokerProfile", "BrokerSecurity", "EMBEDDED_PROFILE",
           "PRODUCTION_PROFILE"]


@dataclass(frozen=True)
class BrokerProfile:
    """Client settings that depend on the broker implementation.

    The embedded Tansu broker needs two measured workarounds
    (../shared/reference/faust-pitfalls.md): group joins take half the session
    timeout, so the session timeout is short; and its end offset is wrong after a
    multi-record produce batch, which silently truncates table recovery, so every
    produce batch carries one record.
    """

    session_timeout_s: float
    heartbeat_interval_s: float
    producer_max_batch_size: int
    producer_linger_s: float
    #: How long the worker's consumer lets the broker hold an empty fetch (Faust: 1.5 s).
    consumer_fetch_max_wait_s: float = 1.5


# Tansu holds an empty fetch for the whole wait even when data arrives: keep it short. Shorter
# than 0.5 s measured slower ingest (smaller batches downstream on the same event loop).
EMBEDDED_PROFILE = BrokerProfile(session_timeout_s=6.0, heartbeat_interval_s=1.0,
                                 producer_max_batch_size=1, producer_linger_s=0.0,
                                 consumer_fetch_max_wait_s=0.5)
PRODUCTION_PROFILE = BrokerProfile(session_timeout_s=30.0, heartbeat_interval_s=3.0,
                                   producer_max_batch_size=16384, producer_linger_s=0.005)


class Secret:
    """A string that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_dsn(dsn: str) -> str:
    """Return ``dsn`` with every password replaced by ``****`` (for logs, ``status`` and stack.json).

    A password can sit in the URL's user info, in its query string (``?password=…``, which
    libpq and asyncpg accept), or in a keyword/value DSN (``host=db password=…``).
    """
    if "://" not in dsn:
        return _KEYWORD_PASSWORD.sub(r"\1****", dsn)
    try:
        parts = urlsplit(dsn)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "****"
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":****@", 1)
    if any(k.lower() == "password" for k, _ in query):
        masked = [(k, "****" if k.lower() == "password" else v) for k, v in query]
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(masked, safe="*")))
    return urlunsplit(parts._replace(netloc=netloc))


# -- series index (issue #17) --
_INDEX_SCHEMES = {"postgresql": "postgres", "postgres": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def index_kind(dsn: str) -> str | None:
    """``postgres`` or ``mysql`` for a series-index DSN by its scheme; None for anything else."""
    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    return _INDEX_SCHEMES.get(scheme)
# -- end series index --


#: A batch is loaded early for an idle partition only once the partition's previous idle load
#: is this old (DICOMFLOW_DORIS_IDLE_SPACING): at most one such load per partition and table
#: every few seconds, however sparse the traffic. Measured from the previous idle load, not from
#: the batch's start nor from the previous load: a burst's last batch follows a full batch loaded
#: on its size, and waiting for either to age only delayed the burst's last rows, by 2-5 s in
#: bench.cost. Loads on size are bounded by their size.
DORIS_IDLE_SPACING_S = 5.0

#: Doris database and table names go into the Stream Load URL: identifiers only.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _identifier(name: str, value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise ConfigError(f"{name} must be a plain identifier (letters, digits, _; at most 64), got {value!r}",
                          field=name)
    return value


def child_env(extra: Mapping[str, str] | None = None, *, drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment for a child process: this process's, minus ``drop_prefixes``, plus ``extra``.

    Here, so that settings stay the only module that reads the environment.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)} if drop_prefixes \
        else dict(os.environ)
    env.update(extra or {})
    return env


N = TypeVar("N", int, float)


def _number(env: Mapping[str, str], name: str, default: N, *, minimum: N, kind: type[N]) -> N:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what}, got {raw!r}", field=name) from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}", field=name)
    return value


def _default_parse_processes() -> int:
    """The ingest parse pool's default size: one process per core, none on 1-2 cores.

    Measured on 2 cores (bench.cost): the pool's process hop cost the worker about 0.8 ms
    CPU per instance more than parsing on the event loop, for no gain in rate."""
    cores = os.cpu_count() or 1
    return cores if cores > 2 else 0


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    return _number(env, name, default, minimum=minimum, kind=int)


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    return _number(env, name, default, minimum=minimum, kind=float)


def _flag(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}", field=name)


def _mapping(env: Mapping[str, str], name: str) -> dict[str, str]:
    """Parse ``A=x,B=y`` into a dict; used for AE-title to tenant maps."""
    raw = env.get(name, "").strip()
    out: dict[str, str] = {}
    if not raw:
        return out
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{name} entries must look like KEY=tenant, got {item!r}", field=name)
        out[key.strip()] = value.strip()
    return out


_HOST_PORT = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?(:[0-9]{1,5})?|\[[0-9a-f:.]+\](:[0-9]{1,5})?")


def _host_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Parse ``host[:port],host2`` (comma-separated, case-insensitive) into lower-case entries."""
    out: list[str] = []
    for item in (env.get(name) or "").split(","):
        entry = item.strip().lower()
        if entry and not _HOST_PORT.fullmatch(entry):
            raise ConfigError(f"{name} entries must look like host or host:port, got {item.strip()!r}", field=name)
        if entry:
            out.append(entry)
    return tuple(out)


_BROKER_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class BrokerSecurity:
    """How every Kafka client authenticates to the broker (TLS and/or SASL); plaintext by default.

    ``streams.broker.kafka_client_kwargs`` turns it into aiokafka's keyword arguments.
    """

    #: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (aiokafka's ``security_protocol``).
    protocol: str = "PLAINTEXT"
    #: CA bundle that the broker's certificate must chain to; None: the system CAs.
    ssl_ca: Path | None = None
    #: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL protocols only).
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret = field(default_factory=lambda: Secret(""))

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, embedded: bool = False) -> BrokerSecurity:
        env = os.environ if env is None else env
        name = "DICOMFLOW_BROKER_SECURITY_PROTOCOL"
        protocol = (env.get(name) or "PLAINTEXT").strip().upper()
        if protocol not in _BROKER_PROTOCOLS:
            raise ConfigError(f"{name} must be one of {', '.join(_BROKER_PROTOCOLS)}, got {protocol!r}", field=name)
        ca = env.get("DICOMFLOW_BROKER_SSL_CA") or None
        mechanism = (env.get("DICOMFLOW_BROKER_SASL_MECHANISM") or "").strip().upper() or None
        username = env.get("DICOMFLOW_BROKER_SASL_USERNAME") or None
        password = env.get("DICOMFLOW_BROKER_SASL_PASSWORD") or None
        if embedded and protocol != "PLAINTEXT":
            raise ConfigError(f"{name}={protocol}: the embedded broker speaks plaintext only; set "
                              "DICOMFLOW_BROKER to a broker that offers TLS/SASL", field=name)
        if ca and protocol not in ("SSL", "SASL_SSL"):
            raise ConfigError(f"DICOMFLOW_BROKER_SSL_CA needs {name}=SSL or SASL_SSL, got {protocol}",
                              field="DICOMFLOW_BROKER_SSL_CA")
        if protocol.startswith("SASL_"):
            mechanism = mechanism or "PLAIN"
            if mechanism not in _SASL_MECHANISMS:
                raise ConfigError(f"DICOMFLOW_BROKER_SASL_MECHANISM must be one of {', '.join(_SASL_MECHANISMS)}, "
                                  f"got {mechanism!r}", field="DICOMFLOW_BROKER_SASL_MECHANISM")
            if not username or not password:
                raise ConfigError(f"{name}={protocol} needs DICOMFLOW_BROKER_SASL_USERNAME and "
                                  "DICOMFLOW_BROKER_SASL_PASSWORD", field="DICOMFLOW_BROKER_SASL_USERNAME")
        elif mechanism or username or password:
            raise ConfigError(f"DICOMFLOW_BROKER_SASL_* need {name}=SASL_PLAINTEXT or SASL_SSL, got {protocol}",
                              field="DICOMFLOW_BROKER_SASL_USERNAME")
        return cls(protocol=protocol, ssl_ca=Path(ca).expanduser() if ca else None, sasl_mechanism=mechanism,
                   sasl_username=username, sasl_password=Secret(password or ""))

    def describe(self) -> str:
        """``SASL_SSL SCRAM-SHA-512 user=x`` (never the password), for logs and ``status``."""
        parts = [self.protocol]
        if self.sasl:
            parts += [str(self.sasl_mechanism), f"user={self.sasl_username}"]
        if self.ssl_ca is not None:
            parts.append(f"ca={self.ssl_ca}")
        return " ".join(parts)


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first is the default), case-insensitive."""
    raw = (env.get(name) or choices[0]).lower()
    if raw not in choices:
        raise ConfigError(f"{name} must be {' or '.join(choices)}, got {raw!r}", field=name)
    return raw


def _profile(env: Mapping[str, str], broker: str | None) -> str:
    raw = (env.get("DICOMFLOW_BROKER_PROFILE") or ("tansu" if broker is None else "kafka")).lower()
    if raw not in ("tansu", "kafka"):
        raise ConfigError(f"DICOMFLOW_BROKER_PROFILE must be tansu or kafka, got {raw!r}",
                          field="DICOMFLOW_BROKER_PROFILE")
    return raw


@dataclass(frozen=True)
class Settings:
    """Effective configuration. Build with :meth:`from_env`; override with :meth:`replace`."""

    home: Path
    storage_root: Path
    broker: str | None
    partitions: int
    app_id: str
    worker_id: str
    web_port: int
    #: Address the worker's web server (metrics, pages) listens on; loopback unless opened on purpose.
    web_bind: str
    series_window_seconds: float
    #: A series window is flushed before its end once its series received nothing for this long
    #: and its source partition is read to the end (at most once per window length per series;
    #: 0: off). Needs an index (the windows held in memory).
    series_quiet_seconds: float
    postgres_dsn: Secret | None
    doris_fe_url: str | None
    doris_user: str
    doris_password: Secret
    doris_database: str
    doris_tables: dict[str, str]
    doris_max_rows: int
    doris_max_bytes: int
    doris_max_interval: float
    doris_dedup_window: int
    #: A batch whose partition received nothing for this long (and whose previous idle load is at
    #: least doris_idle_spacing old) is loaded then, not at _MAX_INTERVAL: a burst's tail reaches
    #: Doris about a second after it (0: off).
    doris_idle_flush: float
    #: Idle loads of one partition and table are at least this far apart: however sparse the
    #: traffic, it makes at most one small load per partition and table per interval.
    doris_idle_spacing: float
    ingest_processes: int
    scp_host: str
    scp_port: int
    scp_aet: str
    default_tenant: str | None
    tenant_by_calling_ae: dict[str, str]
    tenant_by_called_ae: dict[str, str]
    tenant_from_private_tag: bool
    tls_cert: Path | None
    tls_key: Path | None
    log_level: str
    broker_profile: str
    embedded_broker_port: int
    replication: int
    workers: int = 1
    #: Who serves the SCP's associations: asyncio (default) or pynetdicom (feeders.scp.config).
    scp_engine: str = "asyncio"
    #: Feeders acknowledge once an event is in the journal under ``home``, and a relay publishes
    #: it (the embedded stack, whose broker keeps nothing across a restart).
    journal: bool = False
    #: How long the relay waits at shutdown for the pipeline to drain before it stops anyway.
    relay_drain_seconds: float = 45.0
    #: ``up`` recycles the embedded broker (which never frees what it stored) at a drained
    #: point once its resident memory passes this many MB (DICOMFLOW_BROKER_RECYCLE_MB; 0: never).
    broker_recycle_mb: int = 512
    #: The relay publishes no further while ingest lags this many storage events (DICOMFLOW_RELAY_MAX_AHEAD):
    #: a backlog then waits in the journal on disk, not in the broker's memory.
    relay_max_ahead: int = 5000
    #: How long the Doris transfer log's loaded keys are kept (DICOMFLOW_DORIS_LOADED_RETENTION_HOURS):
    #: at least the topics' retention (Kafka's default is 7 days), within which a replay can happen.
    doris_loaded_retention_hours: float = 168.0
    tansu_log: str = "warn"
    #: Stream Load redirect targets (host or host:port, lower case) that may receive the Doris
    #: credentials besides the FE's own host (DICOMFLOW_DORIS_BE_ALLOWLIST).
    doris_be_allowlist: tuple[str, ...] = ()
    #: CA bundle that client certificates must chain to (DICOMFLOW_SCP_TLS_CA); None: none requested.
    scp_tls_ca: Path | None = None
    #: Verified client certificate CN -> tenant (DICOMFLOW_TENANT_BY_CERT_CN); wins over AE titles.
    tenant_by_cert_cn: dict[str, str] = field(default_factory=dict)
    #: TLS/SASL of every Kafka client (DICOMFLOW_BROKER_SECURITY_PROTOCOL, _SSL_CA, _SASL_*).
    broker_security: BrokerSecurity = field(default_factory=BrokerSecurity)
    #: DICOMFLOW_INDEX_DSN as given (postgresql:// or mysql://); unset: the index is postgres_dsn.
    index_url: Secret | None = None
    # --- series JSON (issue #16; agents/series_json.py) ---
    #: Generate series JSON documents (needs a series index).
    json_enabled: bool = True
    #: Root of the documents (``{root}/{tenant}/metadata/{date}/{study}/{series}.json``); None: storage_root.
    json_root: Path | None = None
    #: A series is written once it has had no new state for this long.
    json_quiet_seconds: float = 300.0
    #: Base64 length above which a binary value becomes a BulkDataURI.
    json_bulk_threshold: int = 1024
    #: Prefix of every BulkDataURI (the WADO-RS root); empty: relative URIs.
    json_bulkdata_base: str = ""
    #: Write ``.json.gz`` instead of ``.json``.
    json_gzip: bool = False
    #: Consumer lag (events, over the app's consumed topics) above which JSON work waits.
    json_max_lag: int = 1000
    #: Failed generations of one state retried (backoff from json_retry_seconds, doubling, capped at 1 h).
    json_max_retries: int = 5
    json_retry_seconds: float = 30.0
    # --- end series JSON ---
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def index_dsn(self) -> Secret | None:
        """The series index: DICOMFLOW_INDEX_DSN, else DICOMFLOW_POSTGRES_DSN (None: no index)."""
        return self.index_url if self.index_url is not None else self.postgres_dsn

    @property
    def index_dsn_variable(self) -> str:
        """The variable the index DSN came from, for error messages."""
        return "DICOMFLOW_INDEX_DSN" if self.index_url is not None else "DICOMFLOW_POSTGRES_DSN"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``env`` (default: the process environment).

        ``overrides`` are variables by name (``DICOMFLOW_BROKER="kafka://…"``) that win over
        the environment, for command-line flags; ``None`` means "not given".
        """
        env = os.environ if env is None else env
        given = {name: str(value) for name, value in overrides.items() if value is not None}
        if given:
            env = {**env, **given}
        home = Path(env.get("DICOMFLOW_HOME") or Path.home() / ".dicomflow").expanduser()
        storage_root = Path(env.get("DICOMFLOW_STORAGE_ROOT") or home / "storage").expanduser()
        broker = env.get("DICOMFLOW_BROKER") or None
        if broker is not None and not broker.startswith(("kafka://", "aiokafka://")):
            raise ConfigError(
                f"DICOMFLOW_BROKER must look like kafka://host:port, got {broker!r}",
                field="DICOMFLOW_BROKER",
            )
        dsn = env.get("DICOMFLOW_POSTGRES_DSN") or None
        index_url = env.get("DICOMFLOW_INDEX_DSN") or None
        if index_url is not None and index_kind(index_url) is None:
            raise ConfigError(f"DICOMFLOW_INDEX_DSN must start with postgresql:// or mysql://, got "
                              f"{mask_dsn(index_url)!r}", field="DICOMFLOW_INDEX_DSN")
        if dsn is None and index_url is not None and index_kind(index_url) == "postgres":
            dsn = index_url  # the PostgreSQL helpers (Doris loaded keys) use the index's server
        # DICOMFLOW_DORIS_<KIND>_TABLE renames the Doris table of any kind the topology loads.
        tables = {m.group(1).lower(): _identifier(name, value) for name, value in env.items() if value
                  and (m := re.fullmatch(r"DICOMFLOW_DORIS_([A-Z0-9]+)_TABLE", name))}
        cert = env.get("DICOMFLOW_SCP_TLS_CERT") or None
        key = env.get("DICOMFLOW_SCP_TLS_KEY") or None
        if bool(cert) != bool(key):
            raise ConfigError(
                "DICOMFLOW_SCP_TLS_CERT and DICOMFLOW_SCP_TLS_KEY must be set together",
                field="DICOMFLOW_SCP_TLS_CERT",
            )
        client_ca = env.get("DICOMFLOW_SCP_TLS_CA") or None
        if client_ca and not cert:
            raise ConfigError("DICOMFLOW_SCP_TLS_CA (client certificates) needs DICOMFLOW_SCP_TLS_CERT and "
                              "DICOMFLOW_SCP_TLS_KEY (TLS)", field="DICOMFLOW_SCP_TLS_CA")
        by_cert_cn = _mapping(env, "DICOMFLOW_TENANT_BY_CERT_CN")
        if by_cert_cn and not client_ca:
            raise ConfigError("DICOMFLOW_TENANT_BY_CERT_CN needs DICOMFLOW_SCP_TLS_CA: only a verified "
                              "client certificate may choose a tenant", field="DICOMFLOW_TENANT_BY_CERT_CN")
        return cls(
            home=home,
            storage_root=storage_root,
            broker=broker,
            partitions=_int(env, "DICOMFLOW_PARTITIONS", 4, minimum=1),
            app_id=env.get("DICOMFLOW_APP_ID") or "dicomflow",
            worker_id=env.get("DICOMFLOW_WORKER_ID") or socket.gethostname(),
            web_port=_int(env, "DICOMFLOW_WEB_PORT", 6066, minimum=1),
            web_bind=env.get("DICOMFLOW_WEB_BIND") or "127.0.0.1",
            series_window_seconds=_float(env, "DICOMFLOW_SERIES_WINDOW_SECONDS", 5.0, minimum=0.1),
            series_quiet_seconds=_float(env, "DICOMFLOW_SERIES_QUIET_SECONDS", 1.0, minimum=0.0),
            postgres_dsn=Secret(dsn) if dsn else None,
            doris_fe_url=(env.get("DICOMFLOW_DORIS_FE_URL") or "").rstrip("/") or None,
            doris_user=env.get("DICOMFLOW_DORIS_USER") or "root",
            doris_password=Secret(env.get("DICOMFLOW_DORIS_PASSWORD") or ""),
            doris_database=_identifier("DICOMFLOW_DORIS_DATABASE", env.get("DICOMFLOW_DORIS_DATABASE") or "dicomflow"),
            doris_tables=tables,
            doris_max_rows=_int(env, "DICOMFLOW_DORIS_MAX_ROWS", 5000, minimum=1),
            doris_max_bytes=_int(env, "DICOMFLOW_DORIS_MAX_BYTES", 16 * 1024 * 1024, minimum=1024),
            doris_max_interval=_float(env, "DICOMFLOW_DORIS_MAX_INTERVAL", 20.0, minimum=0.05),
            doris_dedup_window=_int(env, "DICOMFLOW_DORIS_DEDUP_WINDOW", 100_000, minimum=0),
            doris_idle_flush=_float(env, "DICOMFLOW_DORIS_IDLE_FLUSH", 1.0, minimum=0.0),
            doris_idle_spacing=_float(env, "DICOMFLOW_DORIS_IDLE_SPACING", DORIS_IDLE_SPACING_S,
                                      minimum=0.0),
            doris_be_allowlist=_host_list(env, "DICOMFLOW_DORIS_BE_ALLOWLIST"),
            # On 2 cores the pool's process hop costs more than the overlap gains (issue #15).
            ingest_processes=_int(env, "DICOMFLOW_INGEST_PROCESSES", _default_parse_processes(), minimum=0),
            scp_host=env.get("DICOMFLOW_SCP_HOST") or "0.0.0.0",
            scp_port=_int(env, "DICOMFLOW_SCP_PORT", 11112, minimum=1),
            scp_aet=env.get("DICOMFLOW_SCP_AET") or "DICOMFLOW",
            default_tenant=env.get("DICOMFLOW_DEFAULT_TENANT") or None,
            tenant_by_calling_ae=_mapping(env, "DICOMFLOW_TENANT_BY_CALLING_AE"),
            tenant_by_called_ae=_mapping(env, "DICOMFLOW_TENANT_BY_CALLED_AE"),
            tenant_from_private_tag=(env.get("DICOMFLOW_TENANT_FROM_PRIVATE_TAG", "").lower()
                                     in ("1", "true", "yes")),
            tls_cert=Path(cert) if cert else None,
            tls_key=Path(key) if key else None,
            scp_tls_ca=Path(client_ca) if client_ca else None,
            tenant_by_cert_cn=by_cert_cn,
            log_level=(env.get("DICOMFLOW_LOG_LEVEL") or "INFO").upper(),
            broker_profile=_profile(env, broker),
            broker_security=BrokerSecurity.from_env(env, embedded=broker is None),
            embedded_broker_port=_int(env, "DICOMFLOW_EMBEDDED_BROKER_PORT", 19092, minimum=1),
            replication=_int(env, "DICOMFLOW_REPLICATION", 1, minimum=1),
            workers=_int(env, "DICOMFLOW_WORKERS", 1, minimum=1),
            scp_engine=_choice(env, "DICOMFLOW_SCP_ENGINE", ("asyncio", "pynetdicom")),
            journal=_flag(env, "DICOMFLOW_JOURNAL", default=False),
            relay_drain_seconds=_float(env, "DICOMFLOW_RELAY_DRAIN_SECONDS", 45.0, minimum=0.0),
            broker_recycle_mb=_int(env, "DICOMFLOW_BROKER_RECYCLE_MB", 512, minimum=0),
            relay_max_ahead=_int(env, "DICOMFLOW_RELAY_MAX_AHEAD", 5000, minimum=0),
            doris_loaded_retention_hours=_float(env, "DICOMFLOW_DORIS_LOADED_RETENTION_HOURS", 168.0, minimum=0.0),
            tansu_log=env.get("TANSU_LOG") or "warn",
            index_url=Secret(index_url) if index_url else None,
            # --- series JSON (issue #16) ---
            json_enabled=_flag(env, "DICOMFLOW_JSON", default=True),
            json_root=Path(env["DICOMFLOW_JSON_ROOT"]).expanduser() if env.get("DICOMFLOW_JSON_ROOT") else None,
            json_quiet_seconds=_float(env, "DICOMFLOW_JSON_QUIET_SECONDS", 300.0, minimum=0.0),
            json_bulk_threshold=_int(env, "DICOMFLOW_JSON_BULK_THRESHOLD", 1024, minimum=4),
            json_bulkdata_base=(env.get("DICOMFLOW_JSON_BULKDATA_BASE") or "").rstrip("/"),
            json_gzip=_flag(env, "DICOMFLOW_JSON_GZIP", default=False),
            json_max_lag=_int(env, "DICOMFLOW_JSON_MAX_LAG", 1000, minimum=0),
            json_max_retries=_int(env, "DICOMFLOW_JSON_MAX_RETRIES", 5, minimum=0),
            json_retry_seconds=_float(env, "DICOMFLOW_JSON_RETRY_SECONDS", 30.0, minimum=0.0),
            # --- end series JSON ---
        )

    def doris_table(self, kind: str) -> str:
        """The Doris table of ``kind`` (``state``, ``image``, ``object``…): configured, or ``dicom_{kind}_meta``."""
        return self.doris_tables.get(kind) or f"dicom_{kind}_meta"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def json_documents_root(self) -> Path:
        """Where series JSON documents live: DICOMFLOW_JSON_ROOT, else the storage root (the seeds')."""
        return self.json_root if self.json_root is not None else self.storage_root

    @property
    def embedded_broker(self) -> bool:
        return self.broker is None

    @property
    def profile(self) -> BrokerProfile:
        """Client settings for the broker in use (Tansu workarounds, or normal Kafka ones)."""
        return EMBEDDED_PROFILE if self.broker_profile == "tansu" else PRODUCTION_PROFILE

    @property
    def broker_url(self) -> str:
        """The configured broker, or where the embedded one listens."""
        return self.broker or f"kafka://127.0.0.1:{self.embedded_broker_port}"

    @property
    def journal_dir(self) -> Path:
        return self.home / "journal"

    @property
    def doris_enabled(self) -> bool:
        return self.doris_fe_url is not None

    def describe(self) -> dict[str, Any]:
        """The effective configuration with secrets masked, for the start-up log line."""
        return {
            "home": str(self.home),
            "storage_root": str(self.storage_root),
            "broker": self.broker or f"embedded ({self.broker_url})",
            "broker_profile": self.broker_profile,
            "broker_security": self.broker_security.describe(),
            "partitions": self.partitions,
            "app_id": self.app_id,
            "worker_id": self.worker_id,
            "series_window_seconds": self.series_window_seconds,
            "postgres_dsn": mask_dsn(self.postgres_dsn.get()) if self.postgres_dsn else "unset (PostgreSQL sink off)",
            "index_dsn": mask_dsn(self.index_dsn.get()) if self.index_dsn else "unset (series index off)",
            "doris_fe_url": self.doris_fe_url or "off",
            "doris_user": self.doris_user,
            "doris_database": self.doris_database,
            "scp": f"{self.scp_aet}@{self.scp_host}:{self.scp_port}",
        }
