"""Tenant resolution rules (feeders/tenancy.py), without a network: issue #14 item 9."""

from __future__ import annotations

from pathlib import Path

import pytest

from feeders.tenancy import AssociationTenant, TenantRefused, TenantResolver


def _resolver() -> TenantResolver:
    return TenantResolver(by_calling_ae={"CT1": "hospital-a"}, by_called_ae={"HOSP_B": "hospital-b"},
                          default_tenant="fallback", from_private_tag=True)


@pytest.mark.parametrize("tagged", ["hospital-a", "hospital-b", "HOSPITAL-A", " hospital-b\x00"])
def test_private_tag_cannot_choose_a_mapped_tenant(tagged: str) -> None:
    r = _resolver()
    unmapped = r.for_association("STRANGER", "DICOMFLOW")
    assert unmapped == AssociationTenant("fallback", mapped=False, source="default")
    with pytest.raises(TenantRefused) as refused:
        r.for_instance(unmapped, tagged)
    assert refused.value.reason == "private_tag_names_mapped_tenant"
    assert tagged.strip(" \x00") in str(refused.value)


def test_private_tag_still_chooses_unmapped_tenants() -> None:
    r = _resolver()
    unmapped = r.for_association("STRANGER", "DICOMFLOW")
    assert r.for_instance(unmapped, "clinic-7") == "clinic-7"
    assert r.for_instance(unmapped, "fallback") == "fallback"
    assert r.for_instance(unmapped, None) == "fallback"
    assert r.for_instance(unmapped, "../evil") == "fallback"  # invalid: ignored, as before
    # A mapped caller keeps its tenant whatever the tag says, even another mapped tenant.
    mapped = r.for_association("CT1", "DICOMFLOW")
    assert r.for_instance(mapped, "hospital-b") == "hospital-a"


def test_certificate_cn_wins_and_its_tenant_is_protected() -> None:
    r = TenantResolver(by_calling_ae={"CT1": "hospital-a"}, by_cert_cn={"scanner-9": "hospital-c"},
                       default_tenant="fallback", from_private_tag=True)
    assert r.for_peer("scanner-9").for_association("CT1", "X") == AssociationTenant("hospital-c", True, "cert_cn")
    # A verified certificate whose CN is not mapped falls through to the AE titles.
    assert r.for_peer("other").for_association("CT1", "X") == AssociationTenant("hospital-a", True, "calling_ae")
    assert r.for_peer(None) is r and r.for_association("CT1", "X").source == "calling_ae"
    unmapped = r.for_association("STRANGER", "X")
    with pytest.raises(TenantRefused):
        r.for_instance(unmapped, "hospital-c")


def test_client_ca_needs_the_scp_certificate(tmp_path: Path) -> None:
    from core.errors import ConfigError
    from feeders.scp.config import ScpConfig

    with pytest.raises(ConfigError, match="DICOMFLOW_SCP_TLS_CA"):
        ScpConfig(storage_root=tmp_path, tenancy=TenantResolver(), tls_ca=tmp_path / "ca.pem")
