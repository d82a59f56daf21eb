"""The SCP's configuration, built from :class:`core.settings.Settings`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from feeders.tenancy import TenantResolver

if TYPE_CHECKING:
    from core.settings import Settings

__all__ = ["ScpConfig"]


@dataclass(frozen=True)
class ScpConfig:
    """Everything the SCP needs; build with :meth:`from_settings`."""

    storage_root: Path
    tenancy: TenantResolver
    ae_title: str = "DICOMFLOW"
    host: str = "0.0.0.0"
    #: 0 lets the OS choose; read the bound port from :attr:`StorageSCP.address`.
    port: int = 11112
    worker_node_id: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA bundle client certificates must chain to; set: every client must present one (CERT_REQUIRED).
    tls_ca: Path | None = None
    #: Longer than the publisher's own request timeout, so its BrokerError wins the race.
    publish_timeout_s: float = 15.0
    #: Spool incoming data sets to disk (pynetdicom STORE_RECV_CHUNKED_DATASET).
    spool_to_disk: bool = True
    max_associations: int = 10
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    extra_transfer_syntaxes: tuple[str, ...] = field(default_factory=tuple)
    #: Who serves the associations: "asyncio" (feeders.scp.acceptor, ~8x less CPU per instance)
    #: or "pynetdicom" (its threaded DUL and DIMSE providers, as before issue #15).
    engine: str = "asyncio"

    def __post_init__(self) -> None:
        if self.engine not in ("asyncio", "pynetdicom"):
            raise ConfigError(f"DICOMFLOW_SCP_ENGINE must be asyncio or pynetdicom, got {self.engine!r}",
                              field="DICOMFLOW_SCP_ENGINE")
        if self.tls_ca is not None and not (self.tls_cert and self.tls_key):
            raise ConfigError("a client CA (DICOMFLOW_SCP_TLS_CA) needs the SCP's own TLS certificate and key",
                              field="DICOMFLOW_SCP_TLS_CA")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ScpConfig:
        config = cls(
            storage_root=settings.storage_root,
            tenancy=TenantResolver.from_settings(settings),
            ae_title=settings.scp_aet,
            host=settings.scp_host,
            port=settings.scp_port,
            worker_node_id=settings.worker_id,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            tls_ca=settings.scp_tls_ca,
            engine=settings.scp_engine,
        )
        return replace(config, **overrides) if overrides else config

    def describe(self) -> dict[str, Any]:
        """The effective configuration for the start-up log line (no secrets here)."""
        return {
            "engine": self.engine,
            "ae_title": self.ae_title,
            "listen": f"{self.host}:{self.port}",
            "storage_root": str(self.storage_root),
            "tls": self.tls_cert is not None,
            "tls_client_ca": str(self.tls_ca) if self.tls_ca else None,
            "cert_cn_tenants": len(self.tenancy.by_cert_cn),
            "spool_to_disk": self.spool_to_disk,
            "max_associations": self.max_associations,
            "default_tenant": self.tenancy.default_tenant,
            "calling_ae_tenants": len(self.tenancy.by_calling_ae),
            "called_ae_tenants": len(self.tenancy.by_called_ae),
            "tenant_from_private_tag": self.tenancy.from_private_tag,
        }
