"""Which tenant an incoming DICOM instance belongs to.

The SCP decides twice. At association time (A-ASSOCIATE-RQ) it only knows the AE
titles, and an association that cannot be given any tenant is rejected there, before
a single byte of pixel data arrives. Per instance it may additionally consult the
seeds' private tag (1211,1217) when ``tenant_from_private_tag`` is on.

Precedence, most specific first:

0. ``tenant_by_cert_cn``: the common name of the client certificate, when the SCP
   verifies client certificates (``DICOMFLOW_SCP_TLS_CA``). A certificate is proof
   of identity where an AE title is only a claim, so it wins over both AE maps. A
   verified certificate whose CN is not in the map falls through to the AE titles.
1. ``tenant_by_calling_ae``: the sending device. An operator who maps a device has
   said who owns its data; nothing inside the data may override that.
2. ``tenant_by_called_ae``: the AE title the device addressed (one AE per tenant).
3. The private tag (1211,1217), if enabled and valid: a hint that only replaces
   the default tenant, so a mapped device can never write into another tenant. It may
   not name a *mapped* tenant (a value of the AE-title or certificate maps): an
   unmapped caller that tries is refused (:class:`TenantRefused`, C-STORE status
   0x0124), so an unknown device can never write into a mapped hospital's tenant.
4. ``default_tenant``.

An association whose AE titles map to nothing is rejected with "calling AE title
not recognised" unless ``default_tenant`` is set. On the embedded stack (``dicomflow up``
with no ``DICOMFLOW_BROKER``) it is set by default to :data:`EMBEDDED_DEFAULT_TENANT`, so the
README's first ``send`` and ``backfill`` work; production (an external broker) keeps
rejecting unknown AE titles unless ``DICOMFLOW_DEFAULT_TENANT`` is set.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from core.errors import ConfigError

if TYPE_CHECKING:
    from core.settings import Settings

__all__ = ["EMBEDDED_DEFAULT_TENANT", "TENANT_PATTERN", "AssociationTenant", "TenantRefused", "TenantResolver",
           "default_tenant", "is_valid_tenant"]

log = logging.getLogger(__name__)

#: The storage-event contract's tenant_id pattern (storage_event.v1.schema.json).
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: The tenant of unmapped callers on the embedded stack when ``DICOMFLOW_DEFAULT_TENANT`` is unset.
EMBEDDED_DEFAULT_TENANT = "default"


def default_tenant(settings: Settings) -> str | None:
    """The tenant of unmapped callers: ``DICOMFLOW_DEFAULT_TENANT``, else on the embedded stack
    :data:`EMBEDDED_DEFAULT_TENANT`, else None (production: they are rejected).

    The embedded stack is a broker dicomflow runs itself: no ``DICOMFLOW_BROKER`` in this
    process, or the journal that ``up`` turns on for its children only on that stack.
    """
    if settings.default_tenant is not None:
        return settings.default_tenant
    return EMBEDDED_DEFAULT_TENANT if settings.embedded_broker or settings.journal else None


def is_valid_tenant(value: str | None) -> bool:
    """True if ``value`` satisfies the contract's ``tenant_id`` pattern."""
    return value is not None and TENANT_PATTERN.fullmatch(value) is not None


class TenantRefused(Exception):
    """An instance whose tenant choice is not allowed; the SCP answers 0x0124 (not authorised)."""

    def __init__(self, reason: str, tenant: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        #: The tenant that was asked for and refused.
        self.tenant = tenant


@dataclass(frozen=True, slots=True)
class AssociationTenant:
    """The tenant decided from the AE titles, and whether a private tag may replace it."""

    tenant: str
    #: True when an AE-title mapping decided; False when it is only the default tenant.
    mapped: bool
    source: str


def _checked(name: str, mapping: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for ae, tenant in mapping.items():
        if not is_valid_tenant(tenant):
            raise ConfigError(f"{name}: tenant {tenant!r} for AE {ae!r} does not match "
                              f"{TENANT_PATTERN.pattern}", field=name)
        # AE titles arrive space-padded to 16 characters; compare them stripped.
        out[ae.strip()] = tenant
    return out


@dataclass(frozen=True)
class TenantResolver:
    """Maps AE titles (and optionally the private tag) to a tenant id. Pure; thread-safe."""

    by_calling_ae: Mapping[str, str] = field(default_factory=dict)
    by_called_ae: Mapping[str, str] = field(default_factory=dict)
    default_tenant: str | None = None
    from_private_tag: bool = False
    by_cert_cn: Mapping[str, str] = field(default_factory=dict)
    #: The verified client certificate's CN of the association this resolver is bound to
    #: (:meth:`for_peer`); None for the unbound, shared resolver.
    cert_cn: str | None = None
    #: The default tenant takes callers on this machine only: true when dicomflow picked it
    #: itself (the embedded stack's first run), not when DICOMFLOW_DEFAULT_TENANT was set.
    default_local_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_calling_ae", _checked("tenant_by_calling_ae", self.by_calling_ae))
        object.__setattr__(self, "by_called_ae", _checked("tenant_by_called_ae", self.by_called_ae))
        object.__setattr__(self, "by_cert_cn", _checked("tenant_by_cert_cn", self.by_cert_cn))
        if self.default_tenant is not None and not is_valid_tenant(self.default_tenant):
            raise ConfigError(f"default tenant {self.default_tenant!r} does not match "
                              f"{TENANT_PATTERN.pattern}", field="DICOMFLOW_DEFAULT_TENANT")

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantResolver:
        return cls(
            by_calling_ae=settings.tenant_by_calling_ae,
            by_called_ae=settings.tenant_by_called_ae,
            default_tenant=default_tenant(settings),
            from_private_tag=settings.tenant_from_private_tag,
            by_cert_cn=settings.tenant_by_cert_cn,
            default_local_only=settings.default_tenant is None,
        )

    def for_peer(self, cert_cn: str | None) -> TenantResolver:
        """This resolver bound to one association's verified client certificate CN (or to none)."""
        return self if cert_cn == self.cert_cn else replace(self, cert_cn=cert_cn)

    def for_association(self, calling_ae: str, called_ae: str, *, local: bool = True) -> AssociationTenant | None:
        """The tenant for an association, or None when it must be rejected.

        ``local``: the caller connected from this machine (a loopback address).
        """
        calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
        by_calling = self.by_calling_ae.get(calling_ae)
        by_called = self.by_called_ae.get(called_ae)
        by_cert = self.by_cert_cn.get(self.cert_cn.strip()) if self.cert_cn is not None else None
        if by_cert is not None:
            by_ae = by_calling or by_called
            if by_ae is not None and by_ae != by_cert:
                log.warning("tenant conflict cert_cn=%s tenant=%s calling_ae=%s called_ae=%s ae_tenant=%s "
                            "resolution=cert_cn", self.cert_cn, by_cert, calling_ae, called_ae, by_ae)
            return AssociationTenant(by_cert, mapped=True, source="cert_cn")
        if by_calling is not None:
            if by_called is not None and by_called != by_calling:
                log.warning("tenant conflict calling_ae=%s tenant=%s called_ae=%s called_tenant=%s "
                            "resolution=calling_ae", calling_ae, by_calling, called_ae, by_called)
            return AssociationTenant(by_calling, mapped=True, source="calling_ae")
        if by_called is not None:
            return AssociationTenant(by_called, mapped=True, source="called_ae")
        if self.default_tenant is not None and (local or not self.default_local_only):
            return AssociationTenant(self.default_tenant, mapped=False, source="default")
        return None

    def refusal_reason(self, *, local: bool) -> str:
        """Why :meth:`for_association` refused (for the log line)."""
        if self.default_tenant is not None and self.default_local_only and not local:
            return "unmapped_remote_caller"
        return "calling_ae_not_recognised"

    @property
    def mapped_tenants(self) -> frozenset[str]:
        """Tenants only mapped callers may write into (case-folded, as file systems may fold)."""
        return frozenset(t.casefold() for t in (*self.by_calling_ae.values(), *self.by_called_ae.values(),
                                                *self.by_cert_cn.values()))

    def for_instance(self, association: AssociationTenant, private_tag_value: str | None) -> str:
        """The tenant for one instance received on an accepted association.

        Raises :class:`TenantRefused` when an unmapped caller's private tag names a mapped tenant.
        """
        if not self.from_private_tag or association.mapped or private_tag_value is None:
            return association.tenant
        value = private_tag_value.strip(" \x00")
        if is_valid_tenant(value):
            if value.casefold() in self.mapped_tenants and value.casefold() != association.tenant.casefold():
                raise TenantRefused("private_tag_names_mapped_tenant", value,
                                    f"the private tenant tag names {value!r}, a tenant mapped to AE titles or "
                                    "certificates; "
                                    "only callers mapped to it may store there")
            return value
        log.warning("private tenant tag ignored value=%r reason=pattern tenant=%s",
                    value[:80], association.tenant)
        return association.tenant
