"""The adapter directory, the one artefact that crosses stages: what it holds and what is published.

Signing, publishing and exporting all work on the same file set, defined here once: the PEFT pair
(adapter_config.json, adapter_model.safetensors), the provenance (budwood.json), the card
(README.md), evaluation results (eval/*.json), the training log and loss plot, the calibrated
abstention threshold (calibration.json) that serving applies, and the adapter's own chat template and
tokenizer files where it has them (they change what it is asked). Checkpoints and anything else in the
folder stay local.

Every artefact file must be a regular file: a symlink (to a signing key, a system file) or a fifo or
device is refused by name, so signing, publishing, exporting and pulling never carry another file's
bytes under an artefact's name, nor block on a pipe.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from budwood.errors import BudwoodError

ATTESTATION = "attestation.json"
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
# what the adapter is asked with, where it brings its own (the engine reads chat_template.jinja and
# tokenizer_config.json's template; vLLM and transformers read the tokenizer files): part of its behaviour
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "tokenizer.json",
                  "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                  "merges.txt")
OPTIONAL = ("budwood.json", "README.md", "metrics.jsonl", "loss.png", "calibration.json", *TEMPLATE_FILES)
# the only paths a published version may hold: a manifest naming anything else is refused
ARTIFACT_PATH = re.compile(r"^(adapter_config\.json|adapter_model\.safetensors|budwood\.json|README\.md|"
                           r"metrics\.jsonl|loss\.png|calibration\.json|attestation\.json|"
                           + "|".join(re.escape(f) for f in TEMPLATE_FILES) +
                           r"|eval/[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\.json)$")
# adapter_config.json: a rank or scale outside these is a damaged or hostile file, not a LoRA (vLLM's
# largest max_lora_rank is 512; 65536 leaves room for any full-rank delta of today's models)
MAX_CONFIG_BYTES = 1 << 20
MAX_RANK = 65536
MAX_ALPHA = 1e6
# a staged folder (a pull or export in progress) older than this is abandoned whoever made it
STALE_PARTIAL_S = 24 * 3600
# vLLM's LoRAConfig accepts max_lora_rank only from this list; an adapter needs one at least its rank
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_SERVED_RANK = VLLM_MAX_RANKS[-1]  # also budwood's engine's largest max_lora_rank
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                "gate_up_proj", "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h",
                "dense_4h_to_h", "w1", "w2", "w3", "wq", "wk", "wv", "wo"}


@dataclass
class AdapterDir:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> AdapterDir:
        """The adapter at `path`, its required files regular files and its adapter_config.json sane."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise BudwoodError(f"{path}: no such adapter directory")
        missing = [f for f in REQUIRED if not _exists(path / f)]
        if missing:
            raise BudwoodError(f"{path}: not an adapter directory (missing {', '.join(missing)})")
        for f in REQUIRED:
            check_regular(path / f)
        read_adapter_config(path / "adapter_config.json")
        return cls(path)

    def files(self) -> list[str]:
        """Relative paths of the artefact's files, sorted (POSIX separators); a symlink or special file
        among them is refused by name."""
        names = [*REQUIRED, *(f for f in OPTIONAL if _exists(self.path / f))]
        if _exists(self.path / "eval"):
            if not stat.S_ISDIR(os.lstat(self.path / "eval").st_mode):
                raise BudwoodError(f"{self.path / 'eval'}: a symlink or not a folder; an adapter's eval/ must be "
                                   "a plain folder")
            names += [f"eval/{p.name}" for p in (self.path / "eval").iterdir() if p.name.endswith(".json")]
        names = sorted(n for n in names if ARTIFACT_PATH.match(n))
        for name in names:
            check_regular(self.path / name)
        return names

    def published_files(self) -> list[str]:
        """files() and, where the adapter is signed, its attestation: what publish and export carry."""
        signed = _exists(self.path / ATTESTATION)
        if signed:
            check_regular(self.path / ATTESTATION)
        return self.files() + ([ATTESTATION] if signed else [])

    def _json(self, name: str) -> dict:
        try:
            data = json.loads((self.path / name).read_text())
        except json.JSONDecodeError as e:
            raise BudwoodError(f"{self.path / name}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, dict):
            raise BudwoodError(f"{self.path / name}: expected a JSON object")
        return data

    @property
    def config(self) -> dict:
        return read_adapter_config(self.path / "adapter_config.json")

    @property
    def provenance(self) -> dict:
        """budwood.json, or {} for an adapter made elsewhere (plain peft)."""
        return self._json("budwood.json") if (self.path / "budwood.json").is_file() else {}

    @property
    def base_model(self) -> str:
        name = self.provenance.get("base_model", {}).get("name") or self.config.get("base_model_name_or_path")
        if not name:
            raise BudwoodError(f"{self.path}: names no base model (budwood.json base_model.name or "
                               "adapter_config.json base_model_name_or_path)")
        return name

    @property
    def base_fingerprint(self) -> str | None:
        return self.provenance.get("base_model", {}).get("fingerprint")

    @property
    def fingerprint(self) -> str:
        from budwood.models.fingerprint import adapter_fingerprint

        return adapter_fingerprint(self.path)

    def vllm_warnings(self) -> list[str]:
        """Why vLLM (`--enable-lora`) would refuse this adapter or need settings; empty if it loads as is."""
        cfg, warnings = self.config, []
        rank = max([cfg.get("r", 0), *(cfg.get("rank_pattern") or {}).values()])
        if rank > VLLM_MAX_RANKS[-1]:
            warnings.append(f"rank {rank} is above vLLM's largest max_lora_rank ({VLLM_MAX_RANKS[-1]})")
        elif rank > 16:
            need = next(r for r in VLLM_MAX_RANKS if r >= rank)
            warnings.append(f"rank {rank}: start vLLM with --max-lora-rank {need} (its default is 16)")
        if cfg.get("use_dora"):
            warnings.append("DoRA adapters (use_dora) are not supported by vLLM")
        if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
            warnings.append("LoRA bias terms are not supported by vLLM")
        if cfg.get("modules_to_save"):
            warnings.append(f"modules_to_save {cfg['modules_to_save']} is not supported by vLLM")
        targets = cfg.get("target_modules") or []
        if isinstance(targets, str):
            warnings.append(f"target_modules is a pattern ({targets!r}); vLLM matches module names, check it loads")
        else:
            odd = sorted({t.rsplit(".", 1)[-1] for t in targets} - VLLM_TARGETS)  # full paths too
            if odd:
                warnings.append(f"target modules {odd} are not linear projections vLLM applies LoRA to")
        return warnings


def _exists(path: Path) -> bool:
    """Whether anything is at `path`, a dangling symlink included."""
    return os.path.lexists(path)


def check_regular(path: Path) -> None:
    """Refuse a symlink, fifo, device or socket where an artefact file belongs, naming it: its bytes would
    be another file's (a key, /etc/shadow), or reading it would block."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise BudwoodError(f"{path}: missing") from None
    if stat.S_ISLNK(mode):
        raise BudwoodError(f"{path}: a symlink (to {os.readlink(path)}); an adapter's files must be regular files, "
                           "refusing it")
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"),
                 (stat.S_ISSOCK, "socket"))
        kind = next((name for test, name in kinds if test(mode)), "special file")
        raise BudwoodError(f"{path}: a {kind}, not a regular file; an adapter's files must be regular files, "
                           "refusing it")


def confined_path(name: object) -> bool:
    """Whether `name` (from an attestation or a manifest) is a relative POSIX path inside the adapter: no
    absolute path, `..`, backslash, NUL or empty part, and a file an adapter may hold."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name or name.startswith("/"):
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts) and bool(ARTIFACT_PATH.match(name))


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_adapter_config(cfg: dict, where: str) -> dict:
    """Refuse ranks and scales no LoRA has (NaN, 1e308, `"r": 1e999`, a negative or fractional rank): they load,
    then produce empty text or crash a request. Everything else is peft's to judge."""
    def rank(value, key):
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RANK:
            raise BudwoodError(f"{where}: {key} must be an integer rank from 1 to {MAX_RANK}, got {value!r}",
                               param=key)

    def alpha(value, key):
        if not _finite(value) or abs(value) > MAX_ALPHA:
            raise BudwoodError(f"{where}: {key} must be a finite number within ±{MAX_ALPHA:g}, got {value!r}",
                               param=key)

    if "r" in cfg:
        rank(cfg["r"], "r")
    if "lora_alpha" in cfg:
        alpha(cfg["lora_alpha"], "lora_alpha")
    for key, check in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise BudwoodError(f"{where}: {key} must be a mapping of module pattern to value", param=key)
        for module, value in pattern.items():
            check(value, f"{key}[{module!r}]")
    dropout = cfg.get("lora_dropout")
    if dropout is not None and not (_finite(dropout) and 0 <= dropout < 1):
        raise BudwoodError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}", param="lora_dropout")
    return cfg


def read_adapter_config(path: Path, *, links_allowed: bool = False) -> dict:
    """adapter_config.json, read and checked once for everyone who loads, publishes or serves an adapter
    (check_adapter_config); a file too big, too deep or not an object is refused by name. `links_allowed`:
    serving a folder the operator chose may follow a symlink (a Hugging Face cache snapshot is all symlinks),
    but never into a fifo or device."""
    if not links_allowed:
        check_regular(path)
    elif not stat.S_ISREG(path.stat().st_mode):
        raise BudwoodError(f"{path}: not a regular file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise BudwoodError(f"{path}: {path.stat().st_size} bytes, over the {MAX_CONFIG_BYTES} an adapter config may "
                           "have")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BudwoodError(f"{path}: not valid JSON ({e.__class__.__name__}: {str(e)[:200]})") from None
    except RecursionError:
        raise BudwoodError(f"{path}: nested too deeply to be an adapter config") from None
    if not isinstance(data, dict):
        raise BudwoodError(f"{path}: expected a JSON object")
    return check_adapter_config(data, str(path))


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_PARTIAL = re.compile(r"\.partial-(\d+)\.([0-9a-f]{8})-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clean_stale_partials(dest: Path, max_age_s: float = STALE_PARTIAL_S) -> list[Path]:
    """Remove staged siblings of `dest` left by a killed process: those whose owner (pid on this host, in the
    name) is dead, and any older than `max_age_s`. A live process's staging folder is left alone."""
    removed = []
    try:
        candidates = [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.partial-")]
    except OSError:
        return removed
    now = time.time()
    for p in candidates:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        match = _PARTIAL.search(p.name[len(dest.name) + 1:])
        dead = match is not None and match.group(2) == _HOST and not _alive(int(match.group(1)))
        if dead or now - st.st_mtime > max_age_s:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """Fill a temporary sibling of `dest`, then rename it into place: `dest` appears complete or not at
    all, whatever kills the process midway. `dest` must not exist or be empty. The sibling's name carries
    this process's id, so the next staging of `dest` removes what a killed one left (clean_stale_partials)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-{os.getpid()}.{_HOST}-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
