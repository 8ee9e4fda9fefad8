"""What ``surgeon push`` uploads and how: the commit planned from a local directory (generated model
card included), and that one commit made through huggingface_hub's client."""

from __future__ import annotations

from pathlib import Path

from surgeon.errors import SurgeonError


def _local_files(directory: Path) -> list[Path]:
    """Files to upload: everything but hidden paths (.git, .cache, surgeon's staging dirs)."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(directory).parts)
    )


def plan_commit(directory: Path, repo_id: str, folder: str, base_model: str | None) -> tuple[list[dict], str | None]:
    """What the commit holds, as ``[{"path", "bytes", "source"}]``, and the generated card (None
    when the directory's own README.md is kept)."""
    from surgeon.modelcard import generate, keeps_own_card

    prefix = f"{folder}/" if folder else ""
    card = None if keeps_own_card(directory) else generate(directory, repo_id, base_model)
    entries = [
        {"path": prefix + p.relative_to(directory).as_posix(), "bytes": p.stat().st_size, "source": str(p)}
        for p in _local_files(directory)
        if not (card is not None and p == directory / "README.md")
    ]
    if card is not None:
        entries.append({"path": prefix + "README.md", "bytes": len(card.encode()), "source": "generated model card"})
    return sorted(entries, key=lambda e: e["path"]), card


def _write_error(repo_id: str, error: Exception) -> SurgeonError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return SurgeonError(
            f"the Hub refused to write to {repo_id} ({status}); use a token with write access to it (`hf auth login`, "
            "or HF_TOKEN)."
        )
    return SurgeonError(f"pushing to {repo_id} failed ({str(error).splitlines()[0]}); check the repository and retry.")


def commit(hub, entries: list[dict], card: str | None, revision, create_pr, private, message) -> dict:
    """Create the repository (and branch) if needed and make the one commit; what it made, as URLs."""
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    if huggingface_hub.get_token() is None:
        raise SurgeonError(
            "no Hugging Face token found; log in with `hf auth login` or set HF_TOKEN to a token with write access."
        )
    api = huggingface_hub.HfApi()
    operations = [
        CommitOperationAdd(e["path"], card.encode() if e["source"] == "generated model card" else e["source"])
        for e in entries
    ]
    try:
        api.create_repo(hub.repo_id, repo_type=hub.repo_type, private=private or None, exist_ok=True)
        if revision and revision != "main" and not create_pr:
            api.create_branch(hub.repo_id, repo_type=hub.repo_type, branch=revision, exist_ok=True)
        info = api.create_commit(
            hub.repo_id,
            operations,
            commit_message=message,
            repo_type=hub.repo_type,
            revision=revision,
            create_pr=create_pr,
        )
    except HfHubHTTPError as error:
        raise _write_error(hub.repo_id, error) from None
    return {"commit": info.oid, "commit_url": str(info.commit_url), "pr_url": info.pr_url}
