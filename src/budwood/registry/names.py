"""Names users type: `org/name[@version]` ids, semantic versions and SPDX licence expressions.

Every id is checked here before it reaches a path, a URL or a query, so a name can never climb out of
the blob store or an output folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import semver

from budwood.errors import BudwoodError, ErrorKind

# lower-case like npm and Docker image names: one spelling per adapter, safe as a folder name anywhere
_PART = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
_LICENSE_REF = re.compile(r"^LicenseRef-[A-Za-z0-9.-]+$")


class RegistryError(BudwoodError):
    """A registry refused a request: bad id, unknown adapter, taken version, unaccepted terms."""


class NotFound(RegistryError):
    kind = ErrorKind.NOT_FOUND
    code = "not_found"


class VersionExists(RegistryError):
    """Versions are immutable: the HTTP API answers 409 (remote.py turns it back into this class)."""

    kind = ErrorKind.CONFLICT
    code = "version_exists"


@dataclass(frozen=True)
class AdapterRef:
    namespace: str
    name: str
    version: str | None = None

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.id + (f"@{self.version}" if self.version else "")


def check_part(part: str, what: str, ref: str) -> None:
    if not _PART.match(part) or ".." in part:
        raise RegistryError(f"bad adapter id {ref!r}: the {what} {part!r} must be 1-64 lower-case letters, digits, "
                            "'.', '_' or '-', starting and ending with a letter or digit")


def parse_ref(ref: str, version_required: bool = False) -> AdapterRef:
    """`org/name` or `org/name@1.2.0`."""
    if not isinstance(ref, str) or ref.count("/") != 1:
        raise RegistryError(f"bad adapter id {ref!r}: expected ORG/NAME or ORG/NAME@VERSION")
    body, _, version = ref.partition("@")
    if body.count("/") != 1:
        raise RegistryError(f"bad adapter id {ref!r}: expected ORG/NAME or ORG/NAME@VERSION")
    namespace, name = body.split("/")
    check_part(namespace, "organisation", ref)
    check_part(name, "name", ref)
    if version or "@" in ref:
        version = parse_version(version, ref)
    elif version_required:
        raise RegistryError(f"{ref}: a version is required here (ORG/NAME@X.Y.Z)")
    return AdapterRef(namespace, name, version or None)


def parse_version(version: str, where: str = "") -> str:
    """A semantic version X.Y.Z (pre-release and build parts allowed), returned in canonical form."""
    try:
        return str(semver.Version.parse(version))
    except (ValueError, TypeError):
        raise RegistryError(f"{where + ': ' if where else ''}bad version {version!r}: expected a semantic version "
                            "X.Y.Z such as 1.0.0 or 1.1.0-rc.1") from None


def version_key(version: str) -> semver.Version:
    return semver.Version.parse(version)


def next_version(versions: list[str]) -> str:
    """1.0.0 for a new adapter; after a pre-release, its release; else the latest with its patch raised."""
    if not versions:
        return "1.0.0"
    latest = max(map(version_key, versions))
    return str(latest.finalize_version() if latest.prerelease else latest.bump_patch())


def parse_license(expression: str, has_terms: bool) -> str:
    """A valid SPDX expression, normalised (`apache-2.0` -> `Apache-2.0`); custom licences are
    `LicenseRef-<name>` and must come with their terms."""
    from license_expression import get_spdx_licensing

    if not expression or not expression.strip():
        raise RegistryError("--license is required: an SPDX id such as Apache-2.0, or LicenseRef-NAME with --terms")
    info = get_spdx_licensing().validate(expression)
    unknown = [s for s in info.invalid_symbols if not _LICENSE_REF.match(str(s))]
    if info.errors and (unknown or not info.invalid_symbols):
        hint = " (custom or commercial terms: --license LicenseRef-NAME --terms FILE)"
        raise RegistryError(f"--license {expression!r}: not a valid SPDX licence expression: "
                            f"{'; '.join(info.errors)}{hint}")
    custom = [str(s) for s in info.invalid_symbols]
    if custom and not has_terms:
        raise RegistryError(f"--license {expression!r}: {custom[0]} is a custom licence; "
                            "give its text with --terms FILE")
    return info.normalized_expression or expression.strip()
