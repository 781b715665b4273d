"""The registry on this machine: blobs in a folder, metadata in SQL (SQLite file or PostgreSQL).

Publishing stores the blobs first, then commits the version in one transaction; the database's
unique constraints decide races (two publishes of one version: exactly one commits). Whatever is
published is re-opened from the blob store and checked exactly as `budwood verify` would, so the
server of a remote registry runs the same checks as a local publish.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from budwood.artifacts import ARTIFACT_PATH, ATTESTATION, AdapterDir, check_regular, staged_dir
from budwood.db import budwood_home, default_url, open_database, session_makers
from budwood.errors import BudwoodError, did_you_mean
from budwood.eval.results import own_results
from budwood.registry import models as m
from budwood.registry.names import (
    AdapterRef,
    NotFound,
    RegistryError,
    VersionExists,
    next_version,
    parse_license,
    parse_ref,
    parse_version,
    version_key,
)
from budwood.registry.schemas import AdapterInfo, FileEntry, PublishRequest, VersionInfo
from budwood.registry.store import BlobStore, check_digest, raise_if_full

log = logging.getLogger(__name__)
PULL_MARKER = ".budwood-pull.json"
_CONDITION = re.compile(r"^\s*(?:([a-z_]+)\.)?([A-Za-z0-9_]+)\s*(<=|>=|<|>|==|=)\s*"
                        r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
MAX_CONDITION_CHARS = 200
# automatic versions: a publish that finds its version taken by a concurrent one takes the next, this often
AUTO_VERSION_TRIES = 20


class LicenseNotAccepted(RegistryError):
    def __init__(self, ref: str, license: str, terms: str):
        super().__init__(f"{ref} is licensed under {license} with terms that must be accepted before use; read them "
                         f"below and pull again with --accept-license\n\n{terms}")
        self.terms = terms


# which private adapters a caller sees: all (True), none (False), or those of the namespaces named
# (a tenant of the fine-tuning service sees its own)
Private = bool | frozenset[str]


def _sees(private: Private, adapter: m.Adapter) -> bool:
    return not adapter.private or private is True or (isinstance(private, frozenset) and adapter.namespace in private)


def _visible(query, private: Private):
    if private is True:
        return query
    if not private:
        return query.where(m.Adapter.private.is_(False))
    return query.where(or_(m.Adapter.private.is_(False), m.Adapter.namespace.in_(sorted(private))))


def parse_condition(text: str) -> tuple[str | None, str, str, float]:
    """`hallucination_rate<0.1` or `grounding.hallucination_rate <= 0.1` -> (suite, metric, op, value)."""
    match = _CONDITION.match(text) if isinstance(text, str) and len(text) <= MAX_CONDITION_CHARS else None
    if not match:
        raise RegistryError(f"bad metric condition {str(text)[:MAX_CONDITION_CHARS]!r}: expected [SUITE.]METRIC OP "
                            "NUMBER with OP one of < <= > >= =, e.g. grounding.hallucination_rate<0.1", param="where")
    suite, metric, op, value = match.groups()
    number = float(value)
    if not math.isfinite(number):
        raise RegistryError(f"bad metric condition {text!r}: {value} is not a finite number", param="where")
    return suite, metric, "=" if op == "==" else op, number


def check_condition(text: str, suite: str | None, name: str, recorded: set[str]) -> None:
    """Refuse a condition whose suite budwood does not run, or whose metric no visible version records and
    the card's reliability table does not show either: a typo would otherwise find nothing, silently."""
    from budwood.card.reliability import RELIABILITY_METRICS
    from budwood.eval.run import SUITES

    if suite is not None and suite not in SUITES:
        raise RegistryError(f"{text!r}: no suite {suite!r}{did_you_mean(suite, SUITES)}; suites: {', '.join(SUITES)}",
                            param="where")
    known = recorded | {n for names in RELIABILITY_METRICS.values() for n in names}
    if name not in known:
        raise RegistryError(f"{text!r}: no published version records a metric {name!r}{did_you_mean(name, known)}; "
                            f"recorded: {', '.join(sorted(recorded)) or 'none yet'}", param="where")


class LocalRegistry:
    def __init__(self, database: str | None = None, blobs: str | Path | None = None):
        home = budwood_home()
        self.url = database or os.environ.get("BUDWOOD_DATABASE_URL") or default_url(home)
        self.store = BlobStore(blobs or os.environ.get("BUDWOOD_BLOBS") or home / "blobs")
        self.engine = open_database(self.url)
        self.sessions, self.writes = session_makers(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- publish ------------------------------------------------------------------------------------
    def publish(self, adapter_dir: str | Path, ref: str, license: str, terms: str | None = None,
                private: bool = False, publisher: str | None = None) -> VersionInfo:
        adapter = AdapterDir.open(adapter_dir)
        parsed = parse_ref(ref)
        parse_license(license, bool(terms))  # before anything is stored
        names = adapter.published_files()
        files = []
        for name in names:
            digest, size = self.store.put_file(adapter.path / name)
            files.append(FileEntry(path=name, sha256=digest, size=size))
        return self.commit(PublishRequest(id=parsed.id, version=parsed.version, license=license, terms=terms,
                                          private=private, publisher=publisher, files=files))

    def commit(self, request: PublishRequest) -> VersionInfo:
        """Check a version whose blobs are in the store and record it; versions are never replaced."""
        ref = parse_ref(request.id)
        license = parse_license(request.license, bool(request.terms))
        for f in request.files:
            if not ARTIFACT_PATH.match(f.path):
                raise RegistryError(f"{ref}: {f.path!r} is not a file an adapter version may hold")
            check_digest(f.sha256)
            if not self.store.has(f.sha256):
                raise RegistryError(f"{ref}: {f.path} (blob {f.sha256[:12]}…) was not uploaded")
        if len({f.path for f in request.files}) != len(request.files):
            raise RegistryError(f"{ref}: a file is named twice in the manifest")
        damaged = [f for f in request.files if not self.store.intact(f.sha256)]
        if damaged:  # removed, so that the next upload of the same bytes stores them afresh
            for f in damaged:
                self.store.discard(f.sha256)
            raise RegistryError(f"{ref}: the stored blob{'s' if len(damaged) > 1 else ''} of "
                                f"{', '.join(f.path for f in damaged)} {'were' if len(damaged) > 1 else 'was'} damaged "
                                "on disk and removed; publish again to upload the content afresh", code="damaged_blob")
        for f in request.files:  # intact blobs: the recorded size is what listings and pulls show, so it is theirs
            stored = self.store.path(f.sha256).stat().st_size
            if f.size != stored:
                raise RegistryError(f"{ref}: {f.path} is {stored:,} bytes (blob {f.sha256[:12]}…), not the "
                                    f"{f.size:,} its manifest entry says", code="size_mismatch")
        try:
            with tempfile.TemporaryDirectory(dir=self.store.root / "tmp") as tmp:
                try:
                    facts = self._inspect(Path(tmp), request, license)
                except RegistryError:
                    raise
                except BudwoodError as e:  # about the staged copy: name the version, never the server's folder
                    raise RegistryError(str(e).replace(str(Path(tmp).resolve()), str(ref)).replace(tmp, str(ref)),
                                        code=e.code, param=e.param) from None
        except OSError as e:
            raise_if_full(e, self.store.root)
            raise
        explicit = ref.version or request.version
        wanted = parse_version(explicit) if explicit else None
        for attempt in range(AUTO_VERSION_TRIES):  # an automatic version taken by a concurrent publish: the next
            try:
                version = self._record(ref, request, license, facts, wanted)
                break
            except VersionExists:
                if wanted or attempt == AUTO_VERSION_TRIES - 1:
                    raise
        return self.version_info(f"{ref.id}@{version}")

    def _record(self, ref: AdapterRef, request: PublishRequest, license: str, facts: dict,
                version: str | None) -> str:
        """One transaction: the adapter row (created on first publish), the version, its files and numbers."""
        with self.writes.begin() as s:
            adapter = self._adapter_row(s, ref, request.private)
            existing = [v for (v,) in s.execute(select(m.Version.version).where(m.Version.adapter_id == adapter.id))]
            version = version or next_version(existing)
            if version in existing:
                raise VersionExists(f"{ref.id}@{version} is already published; versions are immutable, publish "
                                    "another version")
            same = next((v for v in existing if version_key(v).compare(version) == 0), None)
            if same is not None:  # SemVer: build metadata does not make another version (1.0.0+x is 1.0.0)
                raise VersionExists(f"{ref.id}@{version} has the same precedence as the published {ref.id}@{same} "
                                    "(build metadata after '+' does not make another version); publish another "
                                    "version")
            row = m.Version(adapter_id=adapter.id, version=version, license=license, terms=request.terms,
                            requires_acceptance=bool(request.terms), publisher=request.publisher,
                            created=datetime.now(UTC), **facts["version"])
            row.files = [m.File(path=f.path, sha256=f.sha256, size=f.size) for f in request.files]
            row.metrics = [m.Metric(suite=su, name=n, value=v) for (su, n), v in facts["metrics"].items()]
            row.tags = [m.Tag(tag=t) for t in facts["tags"]]
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                raise VersionExists(f"{ref.id}@{version} is already published (another publish got there first); "
                                    "versions are immutable, publish another version") from None
        return version

    def _adapter_row(self, s: Session, ref: AdapterRef, private: bool) -> m.Adapter:
        """Create the adapter on first publish; concurrent first publishes both end up with the one row."""
        dialect = sqlite if s.bind.dialect.name == "sqlite" else postgresql
        values = {"namespace": ref.namespace, "name": ref.name, "private": private, "created": datetime.now(UTC)}
        s.execute(dialect.insert(m.Adapter).values(**values).on_conflict_do_nothing())
        # FOR UPDATE: concurrent publishes of one adapter take turns until commit, so each reads the versions
        # the others committed before choosing its own (PostgreSQL; SQLite's writers are serialised already)
        row = s.scalars(select(m.Adapter).where(m.Adapter.namespace == ref.namespace,
                                                m.Adapter.name == ref.name).with_for_update()).one()
        if row.private != private:
            raise RegistryError(f"{ref.id} is {'private' if row.private else 'public'}; a version cannot change that "
                                f"({'drop' if row.private is False else 'add'} --private)")
        return row

    def _inspect(self, tmp: Path, request: PublishRequest, license: str) -> dict:
        """Open the version from its blobs and check it the way `budwood verify` checks a folder."""
        from budwood.card.attest import verify

        for f in request.files:
            dest = tmp / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.store.link_to(f.sha256, dest)
        adapter = AdapterDir.open(tmp)
        signer = None
        if (tmp / ATTESTATION).exists():
            check = verify(tmp)
            if not check.ok:
                raise RegistryError(f"{request.id}: the attestation does not verify: "
                                    + "; ".join(check.problems + [f"{u}: not signed" for u in check.unsigned]))
            signer = check.key_id
        card = _card_metadata(tmp)
        card_license = str(card.get("license") or "")
        if card_license and card_license != "other" and card_license.lower() != license.lower():
            raise RegistryError(f"{request.id}: the card says license {card_license!r} but the publish says "
                                f"{license!r}; re-render the card with the licence you publish under")
        config = adapter.config
        metrics = {}
        for result in own_results(adapter):
            for suite, sr in result.suites.items():
                for name, metric in sr.metrics.items():
                    if metric.value is not None and math.isfinite(metric.value):
                        metrics[(suite, name)] = metric.value
        return {"version": {"base_model": adapter.base_model, "base_fingerprint": adapter.base_fingerprint,
                            "adapter_fingerprint": adapter.fingerprint, "rank": config.get("r"),
                            "description": (card.get("budwood") or {}).get("summary"), "card": card,
                            "provenance": adapter.provenance, "signer": signer},
                "metrics": metrics, "tags": sorted({str(t) for t in card.get("tags") or []})}

    # -- read -----------------------------------------------------------------------------------------
    def _versions_query(self):
        return select(m.Version).join(m.Adapter).options(
            selectinload(m.Version.files), selectinload(m.Version.metrics), selectinload(m.Version.tags),
            selectinload(m.Version.adapter))

    def version_info(self, ref: str, include_private: Private = True) -> VersionInfo:
        """An exact version, or the latest one that is not yanked."""
        parsed = parse_ref(ref)
        with self.sessions() as s:
            rows = s.scalars(self._versions_query().where(m.Adapter.namespace == parsed.namespace,
                                                           m.Adapter.name == parsed.name)).all()
            rows = [r for r in rows if _sees(include_private, r.adapter)]
            if not rows:
                raise NotFound(f"{parsed.id}: no such adapter in the registry")
            if parsed.version:
                row = next((r for r in rows if r.version == parsed.version), None)
                if row is None:
                    raise NotFound(f"{parsed}: no such version (published: "
                                   f"{', '.join(sorted((r.version for r in rows), key=version_key))})")
                return _info(row)
            return _info(_latest(rows) or _raise_all_yanked(parsed.id))

    def show(self, ref: str, include_private: Private = True) -> AdapterInfo:
        parsed = parse_ref(ref)
        with self.sessions() as s:
            rows = s.scalars(self._versions_query().where(m.Adapter.namespace == parsed.namespace,
                                                           m.Adapter.name == parsed.name)).all()
            if not rows or not _sees(include_private, rows[0].adapter):
                raise NotFound(f"{parsed.id}: no such adapter in the registry")
            rows = sorted(rows, key=lambda r: version_key(r.version))
            latest = _latest(rows)
            return AdapterInfo(id=parsed.id, private=rows[0].adapter.private,
                               latest=_info(latest) if latest else None, versions=[_info(r) for r in rows])

    def search(self, text: str | None = None, base: str | None = None, tag: str | None = None,
               license: str | None = None, where: list[str] | None = None,
               include_private: Private = True) -> list[VersionInfo]:
        """The newest non-yanked version of each adapter that matches every filter given."""
        query = _visible(self._versions_query().where(m.Version.yanked.is_(False)), include_private)
        if text:
            like = f"%{text.lower()}%"
            query = query.where(or_(func.lower(m.Adapter.namespace + "/" + m.Adapter.name).like(like),
                                    func.lower(m.Version.description).like(like)))
        if base:
            query = query.where(or_(m.Version.base_model == base, m.Version.base_fingerprint == base))
        if tag:
            query = query.where(m.Version.id.in_(select(m.Tag.version_id).where(m.Tag.tag == tag)))
        if license:
            query = query.where(func.lower(m.Version.license) == license.lower())
        conditions = [(c, *parse_condition(c)) for c in where or []]
        if conditions:
            with self.sessions() as s:
                recorded = set(s.scalars(_visible(select(m.Metric.name).join(m.Version).join(m.Adapter),
                                                  include_private).distinct()))
        for condition, suite, name, op, value in conditions:
            check_condition(condition, suite, name, recorded)
            column = m.Metric.value
            test = {"<": column < value, "<=": column <= value, ">": column > value, ">=": column >= value,
                    "=": column == value}[op]
            sub = select(m.Metric.version_id).where(m.Metric.name == name, test)
            if suite:
                sub = sub.where(m.Metric.suite == suite)
            query = query.where(m.Version.id.in_(sub))
        with self.sessions() as s:
            by_adapter: dict[int, list[m.Version]] = {}
            for row in s.scalars(query):
                by_adapter.setdefault(row.adapter_id, []).append(row)
            found = [_info(_latest(rows)) for rows in by_adapter.values()]
        return sorted(found, key=lambda v: v.id)

    def list(self, include_private: Private = True) -> list[VersionInfo]:
        return self.search(include_private=include_private)

    # -- change -------------------------------------------------------------------------------------
    def yank(self, ref: str, reason: str | None = None, undo: bool = False) -> VersionInfo:
        """Hide a version from `latest` and search; pulling it by its exact version still works, with a warning
        (as with Cargo and PyPI), so that nothing pinned to it breaks."""
        parsed = parse_ref(ref, version_required=True)
        with self.writes.begin() as s:
            row = s.scalars(select(m.Version).join(m.Adapter).where(
                m.Adapter.namespace == parsed.namespace, m.Adapter.name == parsed.name,
                m.Version.version == parsed.version)).one_or_none()
            if row is None:
                raise NotFound(f"{parsed}: no such version")
            row.yanked, row.yank_reason = (False, None) if undo else (True, reason)
        return self.version_info(str(parsed))

    # -- pull -----------------------------------------------------------------------------------------
    def pull(self, ref: str, out: str | Path | None = None, accept_license: bool = False,
             include_private: Private = True) -> tuple[VersionInfo, Path]:
        info = self.version_info(ref, include_private)
        return info, materialize(info, self.store.copy_to, out, accept_license)

    def blob_visible(self, digest: str, include_private: Private) -> bool:
        """Blobs are served only as part of a committed version the caller may see."""
        query = _visible(select(m.File.id).join(m.Version).join(m.Adapter).where(m.File.sha256 == check_digest(digest)),
                         include_private)
        with self.sessions() as s:
            return s.execute(query.limit(1)).first() is not None and self.store.has(digest)


def _latest(rows: list[m.Version]) -> m.Version | None:
    """Newest release not yanked; pre-releases only when there is no release."""
    live = [r for r in rows if not r.yanked]
    releases = [r for r in live if not version_key(r.version).prerelease]
    pool = releases or live
    return max(pool, key=lambda r: version_key(r.version)) if pool else None


def _raise_all_yanked(adapter_id: str):
    raise NotFound(f"{adapter_id}: every version is yanked; pull one by its exact version (ORG/NAME@X.Y.Z)")


def _info(row: m.Version) -> VersionInfo:
    a = row.adapter
    return VersionInfo(
        id=f"{a.namespace}/{a.name}", version=row.version, license=row.license, terms=row.terms,
        requires_acceptance=row.requires_acceptance, base_model=row.base_model, base_fingerprint=row.base_fingerprint,
        adapter_fingerprint=row.adapter_fingerprint, rank=row.rank, description=row.description, card=row.card,
        metrics={f"{x.suite}.{x.name}": x.value for x in sorted(row.metrics, key=lambda x: (x.suite, x.name))},
        tags=sorted(t.tag for t in row.tags), signer=row.signer, publisher=row.publisher, private=a.private,
        yanked=row.yanked, yank_reason=row.yank_reason, created=row.created,
        files=[FileEntry(path=f.path, sha256=f.sha256, size=f.size) for f in row.files])


def _card_metadata(folder: Path) -> dict:
    if not (folder / "README.md").exists():
        return {}
    from budwood.card.render import read_card_metadata

    check_card_yaml(folder / "README.md")
    return json.loads(json.dumps(read_card_metadata(folder / "README.md"), default=str))


def check_card_yaml(path: Path) -> None:
    """Parse a card's front matter with budwood's YAML limits before anything else reads it (an alias bomb
    of a few hundred bytes expands to gigabytes in any walk of the metadata)."""
    from budwood import safeyaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RegistryError(f"{path.name}: cannot read the model card ({e.__class__.__name__})") from None
    try:
        safeyaml.front_matter(text, f"{path.name} metadata")
    except safeyaml.YamlError as e:
        raise RegistryError(str(e), kind=e.kind) from None


def materialize(info: VersionInfo, fetch, out: str | Path | None, accept_license: bool) -> Path:
    """Write a version's files into `out` (default BUDWOOD_HOME/adapters/ORG/NAME/VERSION), each checked
    against its hash on the way; the folder appears complete or not at all."""
    dest = Path(out).expanduser() if out else budwood_home() / "adapters" / info.id / info.version
    marker = {"id": info.id, "version": info.version, "files": {f.path: f.sha256 for f in info.files}}
    if _pulled(dest, marker):
        return dest  # pulled before (its terms were accepted then)
    if info.requires_acceptance and not accept_license:
        raise LicenseNotAccepted(info.ref, info.license, info.terms or "")
    if info.yanked:
        log.warning("%s is yanked%s", info.ref, f": {info.yank_reason}" if info.yank_reason else "")
    if dest.exists():
        if any(dest.iterdir()):
            raise BudwoodError(f"{dest} exists and is not a pull of {info.ref}; choose another --out")
    try:
        with staged_dir(dest) as tmp:
            for f in info.files:
                if not ARTIFACT_PATH.match(f.path):
                    raise RegistryError(f"{info.ref}: refusing file {f.path!r}")
                target = tmp / f.path
                target.parent.mkdir(parents=True, exist_ok=True)
                fetch(f.sha256, target)
            (tmp / PULL_MARKER).write_text(json.dumps(marker, indent=1))
    except OSError as e:
        if _pulled(dest, marker):  # a concurrent pull of the same version finished first
            return dest
        raise_if_full(e, dest.parent)
        raise
    return dest


def _pulled(dest: Path, marker: dict) -> bool:
    """Whether `dest` is a finished pull of this version; one whose files were since replaced by symlinks or
    special files is refused by name (its bytes would be another file's)."""
    try:
        check_regular(dest / PULL_MARKER)
        found = json.loads((dest / PULL_MARKER).read_text()) == marker
    except (OSError, json.JSONDecodeError, BudwoodError):
        return False
    if found:
        for name in marker["files"]:
            try:
                check_regular(dest / name)
            except BudwoodError as e:
                raise RegistryError(f"{e}; remove {dest} and pull again") from None
    return found
