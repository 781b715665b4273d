"""Where the service keeps bytes: tenants' uploaded files and jobs' checkpoints, under one folder that
every worker reaches (a local folder on one machine; a shared mount, such as NFS, for many).

    HOME/files/<tenant>/<file-id>          an upload, exactly as received
    HOME/checkpoints/<job-id>/step-NNNNNNNN/  a training checkpoint (+ metrics.jsonl so far)
    HOME/uploads/<upload-id>/<part-id>     a part of an Upload, until it is completed, cancelled or expired
                                           (counted against the tenant's storage quota until then)

Everything appears complete or not at all (written beside, then renamed); ids are checked against
their pattern before they reach a path, so no name from a request can leave its folder.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from budwood.artifacts import staged_dir
from budwood.errors import BudwoodError

FILE_ID = re.compile(r"^file-[A-Za-z0-9]{24}$")
JOB_ID = re.compile(r"^ftjob-[A-Za-z0-9]{24}$")
UPLOAD_ID = re.compile(r"^upload_[A-Za-z0-9]{24}$")
PART_ID = re.compile(r"^part_[A-Za-z0-9]{24}$")
TENANT = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")


def _checked(pattern: re.Pattern, value: str, what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        raise BudwoodError(f"bad {what} {value!r}", code="invalid_value")
    return value


class Storage:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        for sub in ("files", "checkpoints", "uploads", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def tmp_dir(self) -> Path:
        """A private scratch folder on the same file system, so that renames out of it are atomic."""
        return Path(tempfile.mkdtemp(dir=self.root / "tmp"))

    # -- files ------------------------------------------------------------------------------------------
    def file_path(self, tenant: str, file_id: str) -> Path:
        return self.root / "files" / _checked(TENANT, tenant, "tenant") / _checked(FILE_ID, file_id, "file id")

    def put_file(self, tenant: str, file_id: str, src: Path) -> Path:
        dest = self.file_path(tenant, file_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        os.replace(src, dest)
        return dest

    def delete_file(self, tenant: str, file_id: str) -> None:
        self.file_path(tenant, file_id).unlink(missing_ok=True)

    # -- uploads' parts ------------------------------------------------------------------------------------
    def part_path(self, upload_id: str, part_id: str) -> Path:
        return self.root / "uploads" / _checked(UPLOAD_ID, upload_id, "upload id") / _checked(PART_ID, part_id,
                                                                                               "part id")

    def put_part(self, upload_id: str, part_id: str, src: Path) -> Path:
        dest = self.part_path(upload_id, part_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
        return dest

    def delete_upload(self, upload_id: str) -> None:
        shutil.rmtree(self.root / "uploads" / _checked(UPLOAD_ID, upload_id, "upload id"), ignore_errors=True)

    # -- checkpoints --------------------------------------------------------------------------------------
    def checkpoint_dir(self, job_id: str, step: int) -> Path:
        return self.root / "checkpoints" / _checked(JOB_ID, job_id, "job id") / f"step-{int(step):08d}"

    def put_checkpoint(self, job_id: str, step: int, folder: Path, extra: list[Path]) -> Path:
        """Copy a finished training checkpoint (and `extra` files such as metrics.jsonl) into the store."""
        dest = self.checkpoint_dir(job_id, step)
        if (dest / "trainer_state.json").exists():
            return dest  # the same step of the same job is the same state (exact resume)
        try:
            with staged_dir(dest) as tmp:
                for f in folder.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
                for f in extra:
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
        except OSError:
            if not (dest / "trainer_state.json").exists():  # not another worker's copy of the same step
                raise
        return dest

    def restore_checkpoint(self, job_id: str, step: int, adapter_dir: Path) -> Path:
        """Lay a stored checkpoint out as train() expects it: adapter_dir/checkpoints/step-N (and the
        metrics so far in adapter_dir/metrics.jsonl)."""
        src = self.checkpoint_dir(job_id, step)
        dest = adapter_dir / "checkpoints" / src.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name == "metrics.jsonl":
                shutil.copy2(f, adapter_dir / "metrics.jsonl")
            elif f.is_file():
                shutil.copy2(f, dest / f.name)
        return dest

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / "checkpoints" / _checked(JOB_ID, job_id, "job id"), ignore_errors=True)
