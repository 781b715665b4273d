"""Ids, versions, licences and metric conditions: what users type, checked before it reaches a path or a query."""
import pytest

from budwood.registry.local import parse_condition
from budwood.registry.names import RegistryError, next_version, parse_license, parse_ref, parse_version


def test_ref_parts_and_versions():
    ref = parse_ref("acme/support-bot@1.2.0-rc.1")
    assert (ref.namespace, ref.name, ref.version, ref.id) == ("acme", "support-bot", "1.2.0-rc.1", "acme/support-bot")
    assert parse_ref("acme/x").version is None
    assert str(parse_ref("a.b/c_d@0.0.1")) == "a.b/c_d@0.0.1"


@pytest.mark.parametrize("bad", ["../etc", "acme/..", "acme/../x", "/abs/path", "acme/x/y", "Acme/x", "acme/x y",
                                 "acme/.hidden", "acme/-x", "acme/", "/x", "acme", "acme/x@", "acme/x@1",
                                 "acme/x@1.0", "acme/x@v1.0.0", "acme/x@1.0.0/../y", "a" * 65 + "/x", "acme/x\x00",
                                 "acme\\x/y"])
def test_bad_ids_are_refused_with_the_reason(bad):
    with pytest.raises(RegistryError, match="bad adapter id|bad version|expected ORG/NAME"):
        parse_ref(bad)


def test_version_required_where_it_must_be():
    with pytest.raises(RegistryError, match="a version is required"):
        parse_ref("acme/x", version_required=True)


def test_versions_are_semantic():
    assert parse_version("1.0.0") == "1.0.0"
    for bad in ["1", "1.0", "01.0.0", "1.0.0.0", "latest", ""]:
        with pytest.raises(RegistryError, match="semantic version"):
            parse_version(bad)


def test_next_version():
    assert next_version([]) == "1.0.0"
    assert next_version(["1.0.0", "1.2.0", "1.10.0"]) == "1.10.1"  # numeric, not string, order
    assert next_version(["1.0.0", "2.0.0-rc.1"]) == "2.0.0"  # after a pre-release: its release


def test_licences_are_spdx():
    assert parse_license("apache-2.0", False) == "Apache-2.0"
    assert parse_license("MIT OR Apache-2.0", False) == "MIT OR Apache-2.0"
    assert parse_license("LicenseRef-acme-commercial", True) == "LicenseRef-acme-commercial"
    with pytest.raises(RegistryError, match="not a valid SPDX"):
        parse_license("apache2", False)
    with pytest.raises(RegistryError, match="give its text with --terms"):
        parse_license("LicenseRef-acme-commercial", False)
    with pytest.raises(RegistryError, match="--license is required"):
        parse_license(" ", False)


def test_metric_conditions():
    assert parse_condition("hallucination_rate<0.1") == (None, "hallucination_rate", "<", 0.1)
    assert parse_condition(" grounding.hallucination_rate <= 0.25 ") == ("grounding", "hallucination_rate", "<=", 0.25)
    assert parse_condition("domain.exact_match==1") == ("domain", "exact_match", "=", 1.0)
    for bad in ["hallucination_rate", "x<y", "a.b.c<1", "x ~ 1", "x<1; drop table versions"]:
        with pytest.raises(RegistryError, match="bad metric condition"):
            parse_condition(bad)
