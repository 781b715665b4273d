"""`budwood export DIR --hf OUT [--base-id ORG/NAME] [--key KEY] [--push ORG/NAME]`: the adapter as a Hugging
Face Hub model repository that loads on another machine, optionally uploaded.

The Hub layout is the PEFT layout: adapter_config.json and adapter_model.safetensors at the root,
README.md with the card's YAML metadata, plus budwood's provenance, results and attestation so that
anyone who downloads it can run `budwood verify`. Binary files go through LFS (.gitattributes), as
the Hub requires.

What makes the copy travel: `AutoPeftModelForCausalLM.from_pretrained(OUT)` loads the base that
adapter_config.json's `base_model_name_or_path` names, so that must be a Hub id. Training records the
name it was given: a Hub id is kept; a base trained from a local folder is refused unless `--base-id`
names where it is on the Hub (a path of this machine is never shipped); budwood-tiny, which ships inside
budwood and has no Hub id, is kept (budwood loads it anywhere) with a warning, or rewritten by
`--base-id`. budwood.json keeps the name the adapter was trained with: it is the record of what happened.
The card's YAML `base_model` names the same Hub id, or is left out.

The attestation signs adapter_config.json and README.md as they were: when the export rewrites either,
the shipped signature would fail, so the copy is signed again with `--key`, or, without it, exported
without attestation.json, which the output and the exported card say. An unchanged copy keeps its
attestation. An attestation is never shipped without verifying it in the exported folder.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from budwood.artifacts import ATTESTATION, AdapterDir, staged_dir
from budwood.errors import BudwoodError
from budwood.models.names import TINY_NAME

GITATTRIBUTES = """*.safetensors filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.png filter=lfs diff=lfs merge=lfs -text
"""
NOTE_HEADING = "## Exported for the Hugging Face Hub"


@dataclass
class Export:
    """What `export_hf` wrote, and what the user must know about it."""

    path: Path
    base_model: str  # what the exported adapter_config.json's base_model_name_or_path names
    rewritten: list[str] = field(default_factory=list)  # files that differ from the adapter's own
    signer: str | None = None  # the key id of the exported attestation.json; None: the copy is unsigned
    attestation_left_out: bool = False  # the adapter was signed, its attestation could not travel
    warnings: list[str] = field(default_factory=list)


def export_hf(adapter_dir: str | Path, out: str | Path, base_id: str | None = None, key: str | None = None) -> Export:
    """Write the Hub layout of `adapter_dir` into the empty or new folder `out`; all checks come first, and
    `out` appears complete or not at all. `base_id`: the base's Hub id ORG/NAME, written into the copy's
    adapter_config.json and card. `key`: a signing key name or PEM file that signs the copy."""
    from budwood.card.attest import load_key, verify
    from budwood.card.render import read_card_metadata
    from budwood.registry.local import check_card_yaml

    adapter = AdapterDir.open(adapter_dir)
    names = adapter.published_files()  # refuses symlinks and special files by name, before anything is written
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise BudwoodError(f"{out} exists and is not empty; choose an empty or new folder")
    if not (adapter.path / "README.md").is_file():
        raise BudwoodError(f"{adapter.path}: no model card (README.md); write one first: budwood card {adapter.path}")
    check_card_yaml(adapter.path / "README.md")
    meta = read_card_metadata(adapter.path / "README.md")
    if meta.get("library_name") != "peft" or not isinstance(meta.get("budwood"), dict):
        raise BudwoodError(f"{adapter.path / 'README.md'}: not a budwood card (no library_name: peft / budwood: "
                           f"in its metadata); write one: budwood card {adapter.path}")
    signed = ATTESTATION in names
    if signed:
        check = verify(adapter.path)
        if not check.ok:
            raise BudwoodError(f"{adapter.path}: the attestation does not verify ({'; '.join(check.problems)}"
                               f"{'; unsigned: ' + ', '.join(check.unsigned) if check.unsigned else ''}); "
                               "re-sign it or remove attestation.json")
    if key is not None:
        load_key(key)  # a missing key or wrong passphrase is refused before anything is written
    result = Export(out, _exported_base(adapter, base_id))
    config_text = _portable_config(adapter, result.base_model)
    card_text = _hub_card(adapter, result, signed and key is None, changed=config_text is not None)
    result.rewritten = [n for n, text in (("adapter_config.json", config_text), ("README.md", card_text)) if text]
    if result.base_model == TINY_NAME:
        result.warnings.append(f"adapter_config.json names {result.base_model}, which budwood loads anywhere but "
                               "AutoPeftModelForCausalLM and vLLM cannot find on the Hub; upload the base and pass "
                               "--base-id ORG/NAME (docs/registry.md)")
    result.attestation_left_out = signed and key is None and bool(result.rewritten)
    with staged_dir(out) as tmp:
        for name in names:
            if name == ATTESTATION and (result.attestation_left_out or key is not None):
                continue
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(adapter.path / name, tmp / name)
        for name, text in (("adapter_config.json", config_text), ("README.md", card_text)):
            if text is not None:
                (tmp / name).write_text(text, encoding="utf-8")
        if key is not None:
            from budwood.card.attest import sign

            sign(tmp, key)
        if key is not None or (signed and not result.attestation_left_out):
            check = verify(tmp)
            if not check.ok:  # never ship a signature that fails for whoever downloads it
                raise BudwoodError(f"{out}: the exported attestation does not verify ({'; '.join(check.problems)})")
            result.signer = check.key_id
        (tmp / ".gitattributes").write_text(GITATTRIBUTES)
    if result.attestation_left_out:
        result.warnings.append(f"attestation.json left out: it signs {' and '.join(result.rewritten)} as they were "
                               "before the export; pass --key to sign the exported copy")
    return result


def _exported_base(adapter: AdapterDir, base_id: str | None) -> str:
    """The base_model_name_or_path the copy names: `base_id`, else the adapter's own where another machine
    can resolve it (a Hub id, or budwood-tiny for budwood); a local folder is refused, naming --base-id."""
    from budwood.card.facts import hub_model_id

    current = adapter.config.get("base_model_name_or_path")
    if base_id is not None:
        if hub_model_id(base_id) is None:
            here = " (a folder of the same name exists here)" if Path(base_id).expanduser().exists() else ""
            raise BudwoodError(f"--base-id {base_id!r}: not a Hugging Face Hub model id ORG/NAME{here}",
                               param="base_id")
        _check_cached_base(adapter, base_id)
        return base_id
    if isinstance(current, str) and (hub_model_id(current) or current == TINY_NAME):
        return current
    raise BudwoodError(f"{adapter.path / 'adapter_config.json'}: its base {current!r} is not a Hub id but a folder or "
                       "path of this machine, which no other machine can load; pass --base-id ORG/NAME, the base's Hub "
                       "id (upload the base first: huggingface-cli upload ORG/NAME FOLDER)", param="base_id")


def _check_cached_base(adapter: AdapterDir, base_id: str) -> None:
    """Where `base_id`'s config and weights are already in the local Hugging Face cache (nothing is
    downloaded), they must be the base the adapter was trained on: its recorded fingerprint."""
    from huggingface_hub import try_to_load_from_cache

    from budwood.models.fingerprint import WEIGHT_PATTERNS, model_fingerprint

    recorded = adapter.base_fingerprint
    config = try_to_load_from_cache(base_id, "config.json")
    if recorded is None or not isinstance(config, str):
        return
    folder = Path(config).parent
    if not any(folder.glob(p) for p in WEIGHT_PATTERNS[1:]):
        return
    found = model_fingerprint(str(folder))
    if found != recorded:
        raise BudwoodError(f"--base-id {base_id}: the copy in the local Hugging Face cache ({folder}) has fingerprint "
                           f"{found}, the adapter was trained on {recorded}; name the Hub copy of its own base",
                           param="base_id")


def _portable_config(adapter: AdapterDir, base: str) -> str | None:
    """adapter_config.json with `base` as base_model_name_or_path, written as training writes it (sorted keys,
    indent 2); None where it already names `base`."""
    cfg = adapter.config
    if cfg.get("base_model_name_or_path") == base:
        return None
    return json.dumps({**cfg, "base_model_name_or_path": base}, indent=2, sort_keys=True) + "\n"


def _hub_card(adapter: AdapterDir, result: Export, unsigned_copy: bool, changed: bool) -> str | None:
    """The card with Hub-valid metadata (`base_model` the exported base where it is a Hub id, else left out;
    `datasets` only Hub ids) and, where the copy differs from the adapter, a section saying how; None where
    the card can travel unchanged."""
    from huggingface_hub import ModelCard

    from budwood.card.facts import hub_model_id

    card = ModelCard((adapter.path / "README.md").read_text(encoding="utf-8"))
    data = card.data
    hub_base = hub_model_id(result.base_model)
    tags = [t for t in (data.tags or []) if not str(t).startswith("base_model:")]
    named = [data.datasets] if isinstance(data.datasets, str) else list(data.datasets or [])
    datasets = [d for d in named if hub_model_id(d)]
    wanted = {"base_model": hub_base, "datasets": datasets or None,
              "tags": ([f"base_model:adapter:{hub_base}"] if hub_base else []) + tags}
    if data.base_model == wanted["base_model"] and data.datasets == wanted["datasets"] and data.tags == wanted["tags"] \
            and not changed:
        return None
    for name, value in wanted.items():
        setattr(data, name, value)
    trained_on = adapter.base_model
    lines = [NOTE_HEADING, ""]
    if changed:
        fingerprint = adapter.base_fingerprint or "not recorded"
        lines.append(f"`adapter_config.json` names the base `{result.base_model}` (`base_model_name_or_path`); the "
                     f"adapter was trained on `{trained_on}`, fingerprint `{fingerprint}`, which the model at that "
                     "id must be. `budwood.json` keeps the name it was trained with, and the adapter fingerprint "
                     "(which the results in this card and in `eval/` name) reads the configuration with that name, "
                     "so it is the trained adapter's.")
    if not hub_base:
        lines.append(f"The base `{trained_on}` has no Hugging Face Hub id, so the metadata names no `base_model`: "
                     "budwood ships it and loads it by that name; other libraries need it uploaded to the Hub and "
                     "named with `budwood export --base-id ORG/NAME`.")
    dropped = [d for d in named if d not in datasets]
    if dropped:
        lines.append(f"Data sets named in the card but not Hub ids, left out of the metadata: {', '.join(dropped)}.")
    if unsigned_copy:
        lines.append("The adapter was signed, but its `attestation.json` is not part of this copy: it signs "
                     "`adapter_config.json` and this card as they were before the export, so it would not verify "
                     "here. Ask the publisher for the signed original, or for an export signed with "
                     "`budwood export --key`.")
    if len(lines) > 2:
        body = card.text
        note = "\n\n".join(line for line in lines if line) + "\n\n"
        at = body.find("\n## ")
        card.text = body + "\n" + note if at < 0 else body[:at + 1] + note + body[at + 1:]
    return card.content


def push_hf(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to the Hub model repository `repo_id` (created if missing) in one commit;
    returns the commit's URL. The token is `token`, else huggingface_hub's own (HF_TOKEN, `hf auth login`)."""
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise BudwoodError(f"--push {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`",
                           param="push")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise BudwoodError(f"--private: {repo_id} already exists on the Hub and is public; nothing was "
                               "uploaded (make it private there, or push without --private)", param="private")
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message="Upload adapter exported by budwood")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no response"
        raise BudwoodError(f"--push {repo_id}: the Hub refused ({status}): {str(e).splitlines()[0]}",
                           param="push") from None
    except ValueError as e:  # huggingface_hub's word for a card the Hub's validate-yaml refuses
        raise BudwoodError(f"--push {repo_id}: {e}", param="push") from None
    except (OSError, httpx.TransportError) as e:  # connection refused, DNS, TLS, timeouts
        raise BudwoodError(f"--push {repo_id}: cannot reach the Hub ({e})", param="push") from None
    return commit.commit_url


def check_repo_id(repo_id: str) -> None:
    from budwood.card.facts import hub_model_id

    if hub_model_id(repo_id) is None:
        raise BudwoodError(f"--push {repo_id!r}: not a Hugging Face Hub repository id ORG/NAME", param="push")
