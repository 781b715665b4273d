"""Attestations: an ed25519 signature over the sha256 of every file of an adapter directory.

attestation.json names each file with its hash, the base and adapter fingerprints, and the signer's
public key; the signature covers the canonical JSON of all of it. Anyone can verify with the file
alone; `verify(..., trusted=...)` also pins who must have signed. `rerun` repeats the recorded
evaluations and checks that every number comes out exactly the same.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ValidationError

from budwood.artifacts import ATTESTATION, AdapterDir, check_regular, confined_path
from budwood.errors import BudwoodError

SCHEMA = "budwood.attestation/1"
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AttestationError(BudwoodError):
    pass


class Attestation(BaseModel):
    schema_version: str = SCHEMA
    algorithm: str = "ed25519"
    key_id: str
    public_key: str  # base64 of the raw 32-byte key
    signed_at: str
    base_model: str
    base_fingerprint: str | None
    adapter_fingerprint: str
    files: dict[str, str]  # relative path -> sha256
    signature: str = ""

    def payload(self) -> bytes:
        """The bytes signed: canonical JSON of everything but the signature."""
        return json.dumps(self.model_dump(exclude={"signature"}), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()


@dataclass
class Verification:
    key_id: str | None
    signed_at: str | None = None
    problems: list[str] = field(default_factory=list)
    unsigned: list[str] = field(default_factory=list)  # artefact files added after signing
    files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unsigned


# -- keys ----------------------------------------------------------------------------------------------

def keys_dir() -> Path:
    from budwood.db import budwood_home

    return budwood_home() / "keys"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _passphrase() -> bytes | None:
    value = os.environ.get("BUDWOOD_KEY_PASSPHRASE")
    return value.encode() if value else None


def create_key(name: str = "default", force: bool = False, folder: Path | None = None) -> tuple[str, Path]:
    """A new signing key FOLDER/NAME.pem, by default under BUDWOOD_HOME/keys (mode 600; encrypted when
    BUDWOOD_KEY_PASSPHRASE is set). Returns (key id, path)."""
    if not KEY_NAME.match(name):
        raise AttestationError(f"bad key name {name!r}: letters, digits, '.', '_' or '-'")
    path = (folder or keys_dir()) / f"{name}.pem"
    if path.exists() and not force:
        raise AttestationError(f"{path} exists; a key is never overwritten (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    secret = _passphrase()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_suffix(".pub").write_bytes(public + f" budwood:{name}\n".encode())
    return key_id(key.public_key()), path


def load_key(name_or_path: str) -> Ed25519PrivateKey:
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        if not KEY_NAME.match(name_or_path):
            raise AttestationError(f"no key file {name_or_path}")
        path = keys_dir() / f"{name_or_path}.pem"
    if not path.is_file():
        raise AttestationError(f"no signing key {name_or_path!r} ({path}); create one: budwood keys create "
                               f"{name_or_path if KEY_NAME.match(name_or_path) else ''}".rstrip())
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=_passphrase())
    except (ValueError, TypeError) as e:
        raise AttestationError(f"{path}: cannot read the key ({e}; is BUDWOOD_KEY_PASSPHRASE right?)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AttestationError(f"{path}: not an ed25519 key")
    return key


def list_keys() -> list[tuple[str, str]]:
    """(name, key id) of the keys in keys_dir()."""
    out = []
    for pub in sorted(keys_dir().glob("*.pub")):
        key = serialization.load_ssh_public_key(pub.read_bytes().split(b" budwood:")[0])
        out.append((pub.stem, key_id(key)))
    return out


# -- sign and verify -------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    from budwood.hashing import sha256_file

    return sha256_file(path)


def sign(adapter_dir: str | Path, key: str = "default") -> Path:
    """Write ADAPTER_DIR/attestation.json over the artefact's files as they are now."""
    adapter = AdapterDir.open(adapter_dir)
    private = load_key(key)
    public = private.public_key()
    att = Attestation(
        key_id=key_id(public),
        public_key=base64.b64encode(public.public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)).decode(),
        signed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        base_model=adapter.base_model, base_fingerprint=adapter.base_fingerprint,
        adapter_fingerprint=adapter.fingerprint,
        files={name: _sha256(adapter.path / name) for name in adapter.files()})
    att.signature = base64.b64encode(private.sign(att.payload())).decode()
    path = adapter.path / ATTESTATION
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # a symlink planted there would have the write land on its target
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(att.model_dump_json(indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_attestation(path: Path) -> Attestation:
    try:
        if os.path.lexists(path):
            check_regular(path)
        return Attestation.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise AttestationError(f"{path.parent}: not signed (no {ATTESTATION}); sign it: budwood sign {path.parent}") \
            from None
    except ValidationError as e:
        first = e.errors()[0]
        raise AttestationError(f"{path}: not a budwood attestation ({'.'.join(map(str, first['loc']))}: "
                               f"{first['msg']})") from None


def verify(adapter_dir: str | Path, trusted: set[str] | None = None) -> Verification:
    """Check the signature, then every file's hash; report files changed, missing or added since signing."""
    adapter = AdapterDir.open(adapter_dir)
    att = read_attestation(adapter.path / ATTESTATION)
    result = Verification(att.key_id, att.signed_at, files=len(att.files))
    if att.schema_version != SCHEMA or att.algorithm != "ed25519":
        result.problems.append(f"unsupported attestation {att.schema_version}/{att.algorithm}")
        return result
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(att.public_key, validate=True))
        public.verify(base64.b64decode(att.signature, validate=True), att.payload())
    except (InvalidSignature, ValueError):
        result.problems.append("the signature does not match the attestation (it was altered or not signed by "
                               f"{att.key_id})")
        return result
    if key_id(public) != att.key_id:
        result.problems.append(f"key id {att.key_id} does not belong to the public key in the attestation")
    if trusted is not None and att.key_id not in trusted:
        result.problems.append(f"signed by {att.key_id}, which is not among the trusted keys {sorted(trusted)}")
    outside = [name for name in att.files if not confined_path(name)]
    if outside:  # never look at them: the answer would say whether a file outside the adapter exists
        result.problems += [f"{name!r}: not a file inside the adapter; an attestation may name only the adapter's "
                            "own files" for name in outside]
        return result
    files = adapter.files()
    for name, digest in att.files.items():
        path = adapter.path / name
        if not os.path.lexists(path):
            result.problems.append(f"{name}: signed but missing")
        elif _sha256(path) != digest:
            result.problems.append(f"{name}: changed since it was signed (sha256 differs)")
    result.unsigned = [f for f in files if f not in att.files]
    return result


# -- rerun ---------------------------------------------------------------------------------------------

@dataclass
class RerunRow:
    file: str
    suite: str
    metric: str
    recorded: float | None
    now: float | None

    @property
    def same(self) -> bool:
        return self.recorded == self.now or (self.recorded != self.recorded and self.now != self.now)  # NaN == NaN


@dataclass
class Rerun:
    rows: list[RerunRow]
    notes: list[str]  # e.g. a different hardware or software class than the recorded run's

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.same for r in self.rows)


def rerun(adapter_dir: str | Path, progress=None) -> Rerun:
    """Run every recorded evaluation of this adapter, of its bare base and of the baseline adapters it is
    compared with (eval/baseline-LABEL.json, where their weights are still at the recorded folder) again
    with its recorded configuration, here, and compare each number exactly. Exact equality is only
    expected on the same hardware and software class (the target's system_fingerprint)."""
    from budwood.eval.results import load_results
    from budwood.eval.run import EvalConfig, run_eval

    adapter = AdapterDir.open(adapter_dir)
    rows, notes = [], []
    for name in (f for f in adapter.files() if f.startswith("eval/")):
        recorded = load_results(adapter.path / name)
        spec, why_not = _rerun_target(adapter, Path(name), recorded.target)
        if spec is None:
            notes.append(f"{name}: {why_not}; not re-run")
            continue
        target = recorded.target
        again = run_eval(EvalConfig.model_validate({**recorded.config, "target": spec}), progress)
        if again.target.system_fingerprint != target.system_fingerprint:
            notes.append(f"{name}: recorded on {target.system_fingerprint} ({target.device}, {target.precision}), "
                         f"re-run on {again.target.system_fingerprint} ({again.target.device}, "
                         f"{again.target.precision}): another hardware or software class, so numbers may differ")
        for suite, result in recorded.suites.items():
            for metric, value in result.metrics.items():
                now = again.suites.get(suite).metrics.get(metric) if suite in again.suites else None
                rows.append(RerunRow(name, suite, metric, value.value, now.value if now else None))
    return Rerun(rows, notes)


def _rerun_target(adapter: AdapterDir, name: Path, target) -> tuple[str | None, str | None]:
    """(the target spec to evaluate again, None) or (None, why it cannot be)."""
    from budwood.card.facts import baseline_label
    from budwood.models.fingerprint import adapter_fingerprint

    if target.kind != "local":
        return None, f"measured on a remote endpoint ({target.endpoint})"
    if target.adapter_fingerprint == adapter.fingerprint:
        return f"{target.base}+{adapter.path}", None
    if target.base_fingerprint != adapter.base_fingerprint:
        return None, "measured on another base than this adapter's"
    if target.adapter is None:
        return target.base, None
    if not baseline_label(name):
        return None, "measured on other weights than this adapter's"
    folder = Path(target.adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        return None, f"its baseline adapter is not at {folder} here"
    if adapter_fingerprint(folder) != target.adapter_fingerprint:
        return None, f"the adapter at {folder} is no longer the baseline that was measured (other weights)"
    return f"{target.base}+{folder}", None
