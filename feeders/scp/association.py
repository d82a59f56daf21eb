"""Associations: what the SCP accepts (contexts, TLS policy) and whom (the tenancy check).

An association is accepted only when a tenant can be resolved for its calling/called AE
titles, or for its verified client certificate (:mod:`feeders.tenancy`); TLS, when
configured, is 1.2 at least, and with a client CA every client must present a
certificate that chains to it (the handshake fails otherwise, before any DICOM byte).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.errors import ConfigError
from core.net import no_delay
from feeders.tenancy import TenantResolver

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import Event

    from feeders.scp.config import ScpConfig

__all__ = ["STORAGE_TRANSFER_SYNTAXES", "server_ssl_context", "build_ae", "peer", "peer_certificate_cn",
           "on_connection_open", "handle_association_request", "admit", "certificate_cn", "accepted_syntaxes",
           "storage_sop_classes"]

log = logging.getLogger(__name__)

#: Accepted for every storage SOP class. The data set is stored in whichever of
#: these the sender chose; nothing is transcoded, so any syntax is as cheap as another.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE not recognised.
_RJ_PERMANENT, _RJ_SERVICE_USER, _RJ_CALLING_AE = 0x01, 0x01, 0x03


def server_ssl_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A TLS server context for ``start_server(ssl_context=...)``; TLS 1.2 at least.

    With ``ca``, clients must present a certificate that chains to it (``CERT_REQUIRED``).
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}",
                          field="DICOMFLOW_SCP_TLS_CERT") from exc
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS client CA {ca}: {exc}", field="DICOMFLOW_SCP_TLS_CA") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def accepted_syntaxes(config: ScpConfig) -> list[str]:
    """The transfer syntaxes accepted for every storage SOP class, in order of preference."""
    return list(dict.fromkeys((*STORAGE_TRANSFER_SYNTAXES, *config.extra_transfer_syntaxes)))


def storage_sop_classes() -> frozenset[str]:
    """Every storage SOP class pynetdicom knows (the abstract syntaxes the SCP accepts)."""
    return frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax)


def build_ae(config: ScpConfig) -> AE:
    """The acceptor AE: every storage SOP class in every syntax we store, plus Verification."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.acse_timeout = config.acse_timeout_s
    ae.dimse_timeout = config.dimse_timeout_s
    ae.network_timeout = config.network_timeout_s
    # Any called AE title is accepted: with tenant_by_called_ae one listener serves
    # several titles, and the tenancy check at association time is what gates access.
    ae.require_called_aet = False
    syntaxes = accepted_syntaxes(config)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
    ae.add_supported_context(Verification)
    return ae


def peer(assoc: Association) -> tuple[str, str, str]:
    """(calling AE, called AE, peer IP) of an association, from its A-ASSOCIATE-RQ."""
    rq = assoc.requestor.primitive
    calling = str(getattr(rq, "calling_ae_title", "") or assoc.requestor.ae_title).strip()
    called = str(getattr(rq, "called_ae_title", "") or "").strip()
    try:
        ip = assoc.requestor.address
    except ValueError:
        ip = ""
    return calling, called, ip


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def peer_certificate_cn(assoc: Association) -> str | None:
    """The common name of the peer's verified client certificate, or None (no TLS, no certificate).

    ``getpeercert()`` returns the parsed certificate only once it was verified, i.e. only
    when the server context requires client certificates.
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (OSError, ValueError):
        return None
    return certificate_cn(cert)


def certificate_cn(cert: Any) -> str | None:
    """The common name of a verified peer certificate (``getpeercert()``'s dict), or None."""
    subject: Any = (cert or {}).get("subject", ())
    names = [str(value) for rdn in subject for key, value in rdn if key == "commonName"]
    return names[-1] if names else None


def on_connection_open(event: Event) -> None:
    no_delay(event.assoc)


def admit(tenancy: TenantResolver, calling: str, called: str, ip: str, cert_cn: str | None) -> bool:
    """Whether a tenant can be resolved for an association; logged either way."""
    local = _is_loopback(ip)
    resolved = tenancy.for_peer(cert_cn).for_association(calling, called, local=local)
    if resolved is not None:
        log.info("association accepted calling_ae=%s called_ae=%s source_ip=%s cert_cn=%s tenant=%s "
                 "tenant_source=%s", calling, called, ip, cert_cn, resolved.tenant, resolved.source)
        return True
    log.warning("association rejected reason=%s calling_ae=%s called_ae=%s source_ip=%s cert_cn=%s",
                tenancy.refusal_reason(local=local), calling, called, ip, cert_cn)
    return False


def handle_association_request(event: Event, tenancy: TenantResolver) -> None:
    """EVT_REQUESTED: reject an association that no tenant can be resolved for."""
    calling, called, ip = peer(event.assoc)
    if admit(tenancy, calling, called, ip, peer_certificate_cn(event.assoc)):
        return
    event.assoc.acse.send_reject(_RJ_PERMANENT, _RJ_SERVICE_USER, _RJ_CALLING_AE)
    # As pynetdicom's own ACSE rejection does: wait for the peer to take the
    # A-ASSOCIATE-RJ and close, so it sees a rejection rather than a dropped socket.
    event.assoc.kill()
