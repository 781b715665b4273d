"""`budwood card / keys / sign / verify / publish / pull / list / search / show / yank / export`:
documenting, proving and trading adapters. Each body calls one library function."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from budwood.cli.console import EvalProgress, console, out
from budwood.errors import BudwoodError

app = typer.Typer()
keys_app = typer.Typer(no_args_is_help=True, help="Signing keys (ed25519) for attestations (create, list), and "
                                                   "the fine-tuning service's API keys (issue, revoke, issued).")

REGISTRY_HELP = "registry: a folder, a database URL (sqlite:///…, postgresql://…) or http(s)://server " \
                "(default: BUDWOOD_REGISTRY, else the local one under BUDWOOD_HOME)"
RegistryOption = typer.Option(None, "--registry", envvar="BUDWOOD_REGISTRY", help=REGISTRY_HELP)
ApiKeyOption = typer.Option(None, "--api-key", envvar="BUDWOOD_API_KEY", help="key of a remote registry")


def _registry(location: str | None, api_key: str | None):
    from budwood.registry import open_registry

    return open_registry(location, api_key)


@app.command("card")
def card_cmd(
    adapter_dir: Path = typer.Argument(..., help="adapter directory (its eval/*.json results go in the card)"),
    name: str = typer.Option(None, help="registry id ORG/NAME the card names the adapter by"),
    license: str = typer.Option(None, help="SPDX licence id of the adapter, e.g. apache-2.0; or 'other' with "
                                           "--license-name and --license-link"),
    license_name: str = typer.Option(None, help="with --license other: the licence's short name"),
    license_link: str = typer.Option(None, help="with --license other: where its text is (URL or LICENSE file)"),
    description: str = typer.Option(None, help="one paragraph: what the adapter does"),
    intended_use: str = typer.Option(None, help="what it is for"),
    out_of_scope: str = typer.Option(None, help="what it must not be used for"),
    language: list[str] = typer.Option([], help="language code(s), e.g. en"),
    dataset: list[str] = typer.Option([], help="hub id(s) of the training data, if public"),
    author: str = typer.Option(None, help="who made it"),
    contact: str = typer.Option(None, help="where to report problems"),
) -> None:
    """Write the model card (README.md, Hugging Face format) from provenance and evaluation results.

    Nothing is invented: a fact no file records and no option gives is shown as missing.
    Example: budwood card runs/demo/adapter --name acme/support --license apache-2.0
    """
    from pydantic import ValidationError

    from budwood.card.render import CardInfo, render_card

    try:
        info = CardInfo(name=name, license=license, license_name=license_name, license_link=license_link,
                        description=description, intended_use=intended_use,
                        out_of_scope=out_of_scope, languages=language, datasets=dataset, authors=author,
                        contact=contact)
    except ValidationError as e:
        raise BudwoodError("; ".join((f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: " if err["loc"] else "")
                                   + err["msg"].removeprefix("Value error, ") for err in e.errors())) from None
    path = render_card(adapter_dir, info)
    out.print(f"card: {path}")


@keys_app.command("create")
def keys_create_cmd(
    name: str = typer.Argument("default", help="key name"),
    force: bool = typer.Option(False, "--force", help="replace an existing key of that name"),
) -> None:
    """Create an ed25519 signing key under BUDWOOD_HOME/keys (encrypted if BUDWOOD_KEY_PASSPHRASE is set).

    Example: budwood keys create
    """
    from budwood.card.attest import create_key

    key_id, path = create_key(name, force)
    out.print(f"key {name}: {key_id}\nprivate: {path}\npublic:  {path.with_suffix('.pub')}", soft_wrap=True)


@keys_app.command("list")
def keys_list_cmd() -> None:
    """List signing keys and their ids."""
    from budwood.card.attest import list_keys

    for name, key_id in list_keys():
        out.print(f"{name}\t{key_id}", highlight=False)


@app.command("sign")
def sign_cmd(
    adapter_dir: Path = typer.Argument(..., help="adapter directory"),
    key: str = typer.Option("default", help="key name or PEM file"),
) -> None:
    """Sign the adapter's files (weights, config, provenance, card, results) into attestation.json.

    Example: budwood sign runs/demo/adapter
    """
    from budwood.card.attest import sign

    path = sign(adapter_dir, key)
    out.print(f"attestation: {path}")


@app.command("verify")
def verify_cmd(
    adapter_dir: Path = typer.Argument(..., help="adapter directory"),
    key: list[str] = typer.Option([], help="trusted key id(s) (ed25519:…); the signer must be one of them"),
    rerun: bool = typer.Option(False, "--rerun", help="re-run the recorded evaluations; numbers must match exactly"),
) -> None:
    """Check an adapter's attestation, and with --rerun its recorded evaluation numbers.

    Checks the signature, every file's hash and files added since signing; --rerun repeats the
    recorded evaluations here and compares every number. Exits 1 on any mismatch.

    Example: budwood verify runs/demo/adapter --rerun
    """
    from budwood.card.attest import rerun as rerun_evals
    from budwood.card.attest import verify

    check = verify(adapter_dir, set(key) or None)
    for problem in check.problems:
        out.print(f"[red]✗[/] {escape(problem)}", soft_wrap=True)
    for name in check.unsigned:
        out.print(f"[red]✗[/] {escape(name)}: added after signing (not covered by the signature)", soft_wrap=True)
    if not check.ok:
        raise typer.Exit(1)
    trust = "" if key else "  (pass --key to require a particular signer)"
    out.print(f"[green]✓[/] signature by {check.key_id} ({check.signed_at}); {check.files} files match{trust}",
              soft_wrap=True)
    if not rerun:
        return
    with EvalProgress() as progress:
        result = rerun_evals(adapter_dir, progress)
    for note in result.notes:
        out.print(f"[yellow]![/] {escape(note)}", soft_wrap=True)
    changed = [r for r in result.rows if not r.same]
    for r in changed:
        out.print(f"[red]✗[/] {r.file} {r.suite}.{r.metric}: recorded {r.recorded!r}, now {r.now!r}", soft_wrap=True)
    if not result.rows:
        out.print("[red]✗[/] no evaluation recorded for this adapter to re-run")
        raise typer.Exit(1)
    if changed:
        raise typer.Exit(1)
    out.print(f"[green]✓[/] re-ran the evaluations: all {len(result.rows)} numbers are identical")


@app.command("publish")
def publish_cmd(
    adapter_dir: Path = typer.Argument(..., help="adapter directory (signed and carded, ideally)"),
    name: str = typer.Option(..., help="ORG/NAME, or ORG/NAME@X.Y.Z"),
    version: str = typer.Option(None, help="X.Y.Z (default: 1.0.0, then the latest with its patch raised)"),
    license: str = typer.Option(..., help="SPDX expression (Apache-2.0, MIT, CC-BY-NC-4.0…) or LicenseRef-NAME"),
    terms: Path = typer.Option(None, help="file with custom or commercial terms; pullers must accept them"),
    private: bool = typer.Option(False, "--private", help="visible only to holders of the registry's API key"),
    registry: str = RegistryOption,
    api_key: str = ApiKeyOption,
) -> None:
    """Publish an adapter version to a registry (versions are immutable).

    Checks it loads in peft on its base, stores its files once by hash, records licence, results and
    signature.

    Example: budwood publish runs/demo/adapter --name acme/support --license apache-2.0
    """
    from budwood.registry import publish

    ref = name if version is None or "@" in name else f"{name}@{version}"
    info, warnings = publish(adapter_dir, ref, license, terms, private, _registry(registry, api_key))
    for w in warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    signed = f"signed by {info.signer}" if info.signer else "[yellow]unsigned[/] (budwood sign first)"
    out.print(f"published {info.ref}  ({info.license}, {len(info.files)} files, {signed})", soft_wrap=True)


@app.command("pull")
def pull_cmd(
    ref: str = typer.Argument(..., help="ORG/NAME (latest) or ORG/NAME@X.Y.Z"),
    out_dir: Path = typer.Option(None, "--out", help="folder (default BUDWOOD_HOME/adapters/ORG/NAME/VERSION)"),
    accept_license: bool = typer.Option(False, "--accept-license", help="accept the adapter's licence terms"),
    registry: str = RegistryOption,
    api_key: str = ApiKeyOption,
) -> None:
    """Download an adapter version, checking every file's hash.

    Example: budwood pull acme/support@1.0.0 --out adapters/support
    """

    info, path = _registry(registry, api_key).pull(ref, out_dir, accept_license)
    if info.yanked:
        console.print(f"[yellow]warning:[/] {info.ref} is yanked" + (f": {escape(info.yank_reason)}"
                                                                     if info.yank_reason else ""))
    out.print(f"{info.ref} -> {path}")


def _versions_table(versions, title: str) -> Table:
    """One row per version; the summary column only where the terminal has room for it."""
    wide = out.width >= 110
    table = Table(title=title)
    for col in ("adapter", "version", "base", "licence", "signed", "halluc.") + (("summary",) if wide else ()):
        table.add_column(col, no_wrap=col != "summary", overflow="ellipsis" if col == "summary" else "fold")
    for v in versions:
        rate = v.metrics.get("grounding.hallucination_rate")
        row = [v.id, v.version + (" (yanked)" if v.yanked else ""), v.base_model, v.license,
               "yes" if v.signer else "no", "" if rate is None else f"{rate:.3g}"]
        table.add_row(*row, *([v.description or ""] if wide else []))
    return table


@app.command("list")
def list_cmd(registry: str = RegistryOption, api_key: str = ApiKeyOption) -> None:
    """List the adapters in the registry (latest version of each)."""

    found = _registry(registry, api_key).list()
    out.print(_versions_table(found, f"{len(found)} adapter(s)"))


@app.command("search")
def search_cmd(
    text: str = typer.Argument(None, help="words in the id or the card's summary"),
    base: str = typer.Option(None, help="base model id or fingerprint"),
    tag: str = typer.Option(None, help="a tag of the card"),
    license: str = typer.Option(None, help="SPDX licence"),
    where: list[str] = typer.Option([], help="metric condition, e.g. 'hallucination_rate<0.1', "
                                             "'unanswerable_abstained>=0.8', 'grounding.aurc<0.3', "
                                             "'format_spread<=0.1' or 'domain.exact_match>=0.5' (repeatable; every "
                                             "metric of the adapter's own eval results)"),
    registry: str = RegistryOption,
    api_key: str = ApiKeyOption,
) -> None:
    """Find adapters by text, base model, tag, licence and evaluation results.

    A metric that no version records (nor the card's reliability table) is refused, naming the closest one.
    Example: budwood search support --base budwood-tiny --where 'hallucination_rate<0.6' --where 'aurc<0.3'
    """

    found = _registry(registry, api_key).search(text, base, tag, license, where)
    out.print(_versions_table(found, f"{len(found)} match(es)"))


@app.command("show")
def show_cmd(
    ref: str = typer.Argument(..., help="ORG/NAME"),
    registry: str = RegistryOption,
    api_key: str = ApiKeyOption,
) -> None:
    """Card summary, versions, results and signature status of an adapter."""

    info = _registry(registry, api_key).show(ref)
    latest = info.latest
    head = latest or info.versions[-1]
    out.print(f"[bold]{info.id}[/]{' (private)' if info.private else ''}  base {head.base_model}  "
              f"licence {head.license}{'  (terms must be accepted)' if head.requires_acceptance else ''}",
              soft_wrap=True)
    if head.description:
        out.print(head.description, soft_wrap=True, markup=False)
    out.print(_versions_table(info.versions, "versions"))
    if latest and latest.metrics:
        table = Table(title=f"results of {latest.ref}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for metric, value in latest.metrics.items():
            table.add_row(metric, f"{value:.4g}")
        out.print(table)
    out.print("signature: " + (f"verified at publish, key {head.signer}" if head.signer else "unsigned"))


@app.command("yank")
def yank_cmd(
    ref: str = typer.Argument(..., help="ORG/NAME@X.Y.Z"),
    reason: str = typer.Option(None, help="why (shown to anyone who pulls it)"),
    undo: bool = typer.Option(False, "--undo", help="un-yank"),
    registry: str = RegistryOption,
    api_key: str = ApiKeyOption,
) -> None:
    """Yank a version: no longer the latest or found by search; an exact pull still works, with a warning.

    Example: budwood yank acme/support@1.0.0 --reason "answers with the old return policy"
    """

    info = _registry(registry, api_key).yank(ref, reason, undo)
    out.print(f"{info.ref}: {'yanked' if info.yanked else 'not yanked'}")


@app.command("export")
def export_cmd(
    adapter_dir: Path = typer.Argument(..., help="adapter directory with a card"),
    hf: Path = typer.Option(..., "--hf", help="output folder in the Hugging Face Hub layout (empty or new)"),
    base_id: str = typer.Option(None, "--base-id", help="the base model's Hub id ORG/NAME, written into the copy's "
                                                        "adapter_config.json and card (required for a base trained "
                                                        "from a local folder; budwood-tiny has none of its own)"),
    key: str = typer.Option(None, help="sign the exported copy with this key (name or PEM file, as budwood sign)"),
    push: str = typer.Option(None, "--push", help="then upload OUT to this Hub model repository ORG/NAME (token: "
                                                  "HF_TOKEN or `hf auth login`)"),
    private: bool = typer.Option(False, "--private", help="with --push: create the repository private (an existing "
                                                          "public one is refused)"),
) -> None:
    """Lay the adapter out as a Hugging Face Hub repository that loads elsewhere, and optionally upload it.

    adapter_config.json's base_model_name_or_path must be something another machine resolves: a Hub id is
    kept, a local folder needs --base-id ORG/NAME. A signed adapter whose config or card the export rewrites
    (a new base id, Hub-valid card metadata) cannot keep its signature: --key signs the copy again; without
    it attestation.json is left out, and the output and the exported card say so.

    Example: budwood export runs/demo/adapter --hf out/support --base-id acme/budwood-tiny --push acme/support
    """
    from budwood.registry.export import check_repo_id, export_hf, push_hf

    if private and not push:
        raise BudwoodError("--private applies to --push: name the repository to create with --push ORG/NAME",
                           param="private")
    if push:
        check_repo_id(push)
    result = export_hf(adapter_dir, hf, base_id, key)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    rewritten = f"; rewritten: {', '.join(result.rewritten)}" if result.rewritten else ""
    signed = f"signed by {result.signer}" if result.signer else \
        "[yellow]attestation left out[/]" if result.attestation_left_out else "unsigned"
    out.print(f"exported: {escape(str(result.path))}  (base {escape(result.base_model)}, {signed}{rewritten})",
              soft_wrap=True)
    if push:
        url = push_hf(result.path, push, private)
        out.print(f"pushed: {escape(url)}", soft_wrap=True)
