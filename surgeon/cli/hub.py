"""``surgeon pull`` and ``surgeon push``: the Hub as a source and a destination.

Both go through huggingface_hub's client, so the cache, the endpoint, the token and the progress
bars are the ones every Hugging Face tool uses. ``push`` makes exactly one commit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from surgeon.cli.common import FORCE_OPTION, JSON_OPTION, OUTPUT_OPTION, emit, friendly
from surgeon.errors import SurgeonError
from surgeon.summary import human_bytes


@click.command(short_help="Download what surgeon reads of a Hub repository.")
@click.argument("source")
@OUTPUT_OPTION
@FORCE_OPTION
@JSON_OPTION
@friendly
def pull(source: str, output: Path, force: bool, as_json: bool) -> None:
    """Download what surgeon reads of a Hub repository into a local directory.

    SOURCE is hf://org/name[@revision][/subfolder-or-file]. Only weights (safetensors, or
    pickles where there are none), configs and tokenizer files are fetched: no optimizer state,
    no ONNX or GGUF siblings unless the path names one. Files go through the Hub cache
    (HF_HOME), so a later hf:// input reuses them; HF_HUB_OFFLINE=1 copies from the cache alone.

    \b
    Examples:
      surgeon pull hf://org/adapter -o adapter/
      surgeon pull hf://org/model@v2/checkpoint-500 -o ckpt/
    """
    from surgeon.hub import fetch
    from surgeon.output import atomic_output

    if not source.startswith("hf://"):
        raise SurgeonError(f"{source}: pull takes a Hub path like hf://org/name; a local path needs no pulling.")
    fetched = fetch(source)
    with atomic_output(output, inputs=[fetched.path], force=force) as staging:
        for name in fetched.files:
            origin = fetched.path if fetched.path.is_file() else fetched.path / name
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin, staging / name)  # follows the cache's symlink to the blob
    size = sum((output / name).stat().st_size for name in fetched.files)
    report = {"source": source, "commit": fetched.commit, "output": str(output), "files": fetched.files, "bytes": size}
    emit(
        report,
        as_json,
        f"pulled {len(fetched.files)} files ({human_bytes(size)}) of {source} at {fetched.commit[:10]} -> {output}",
    )


@click.command(short_help="Upload a directory to the Hub in one commit, with a generated model card.")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("destination")
@click.option(
    "--revision",
    default=None,
    help="Branch to commit to (created from main if missing); same as @revision in DESTINATION.",
)
@click.option(
    "--create-pr", is_flag=True, help="Open a pull request with the commit instead of committing to the branch."
)
@click.option(
    "--private", is_flag=True, help="Create the repository as private (an existing repository keeps its visibility)."
)
@click.option(
    "--base-model", default=None, help="Hub id of the base model for the card, when the files do not name one."
)
@click.option("-m", "--message", default=None, help="Commit message (default: 'Upload DIRECTORY-NAME with surgeon').")
@click.option(
    "--dry-run", is_flag=True, help="List what would be committed, generated card included, and send nothing."
)
@JSON_OPTION
@friendly
def push(
    directory: Path, destination: str, revision, create_pr, private, base_model, message, dry_run, as_json
) -> None:
    """Upload DIRECTORY to the Hub repository DESTINATION in one commit, with a model card.

    DESTINATION is hf://org/name[@revision][/folder]. The repository is created if it does not
    exist. The card says what the directory is: for an adapter, its base model (Hub metadata
    base_model, base_model_relation: adapter), rank, alpha and targets; for a checkpoint, its
    architecture and parameters; and the surgeon command that made it where the files record
    one. A README.md you wrote is uploaded as it is instead; PEFT's unfilled template is replaced.

    \b
    Examples:
      surgeon push out/ hf://me/my-adapter --private
      surgeon push out/ hf://me/my-adapter --dry-run
      surgeon push merged/ hf://me/model@experiments --create-pr
    """
    from surgeon.hub import parse
    from surgeon.hub_push import commit, plan_commit

    hub = parse(destination)
    if revision and hub.revision and revision != hub.revision:
        raise SurgeonError(f"{destination} names revision {hub.revision!r} but --revision says {revision!r}; give one.")
    revision = revision or hub.revision
    entries, card = plan_commit(directory, hub.repo_id, hub.path_in_repo, base_model)
    message = message or f"Upload {directory.name} with surgeon"
    report = {
        "repo": hub.repo_id,
        "repo_type": hub.repo_type,
        "revision": revision or "main",
        "create_pr": create_pr,
        "private": private,
        "message": message,
        "dry_run": dry_run,
        "files": [{k: e[k] for k in ("path", "bytes", "source")} for e in entries],
        "card": card,
    }
    total = human_bytes(sum(e["bytes"] for e in entries))
    width = max(len(e["path"]) for e in entries)
    listing = "\n".join(
        f"  {e['path']:<{width}}  {human_bytes(e['bytes']):>9}"
        + ("  (generated model card)" if e["source"] == "generated model card" else "")
        for e in entries
    )
    where = f"{hub.repo_id}@{revision or 'main'}" + (" as a pull request" if create_pr else "")
    if dry_run:
        card_text = f"\n--- README.md (generated) ---\n{card}" if card else "\n(README.md uploaded as it is)"
        emit(report, as_json, f"would commit {len(entries)} files ({total}) to {where}:\n{listing}{card_text}")
        return
    report.update(commit(hub, entries, card, revision, create_pr, private, message))
    text = f"committed {len(entries)} files ({total}) to {where}: {report['commit_url']}"
    emit(report, as_json, text + (f"\npull request: {report['pr_url']}" if report.get("pr_url") else ""))
