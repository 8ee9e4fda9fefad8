"""``hf://org/name[@revision][/path]`` inputs: fetched through huggingface_hub's own cache, only
the files surgeon reads, and handed back as a local path.

Everything about where and how is the client's: ``HF_HOME``/``HF_HUB_CACHE`` choose the cache,
``HF_HUB_OFFLINE=1`` reads it without network, ``HF_ENDPOINT`` picks the server, the token comes
from ``HF_TOKEN`` or ``hf auth login``, and the progress bars are its own. What surgeon adds is the
choice of files (no optimizer states, no pickles or GGUF beside safetensors, no ONNX graphs; a path
that names a file fetches that file alone) and errors that say what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from surgeon.errors import SurgeonError

# What surgeon reads: weights, configs, tokenizers and chat templates (copied along by merge).
WANTED = ["*.safetensors", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.onnx_adapter", "*.npz"]
# Other encodings of weights (pickles, GGUF), fetched only where a folder has no safetensors: a
# repository often holds the same weights several ways, and GGUF repositories hold many
# quantisations (name the one you want: hf://org/name/model-q8_0.gguf).
ALTERNATES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf"]
# Trainer state that shares those suffixes and is never weights.
TRAINING_STATE = ["*training_args.bin", "*optimizer.pt", "*scheduler.pt", "*scaler.pt", "*rng_state*.pth"]
# A path ending like this names one file, fetched alone.
FILE_SUFFIXES = {".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".json", ".onnx_adapter", ".npz"}


@dataclass(frozen=True)
class HubPath:
    """A parsed ``hf://`` path."""

    uri: str
    repo_id: str
    repo_type: str
    revision: str | None
    path_in_repo: str

    @property
    def web_url(self) -> str:
        from huggingface_hub import constants

        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{constants.ENDPOINT}/{prefix}{self.repo_id}"

    @property
    def names_file(self) -> bool:
        return PurePosixPath(self.path_in_repo).suffix in FILE_SUFFIXES


@dataclass(frozen=True)
class Fetched:
    path: Path  # the file or folder asked for, inside the snapshot
    commit: str
    files: list[str]  # paths relative to ``path`` (just the name for a file)


def parse(uri: str) -> HubPath:
    """Split an ``hf://`` path by huggingface_hub's grammar ``hf://[<TYPE>/]<ID>[@<REVISION>][/<PATH>]``."""
    from huggingface_hub.errors import HfUriError
    from huggingface_hub.utils import parse_hf_uri

    try:
        parsed = parse_hf_uri(uri)
    except HfUriError as error:
        raise SurgeonError(
            f"{uri}: not a Hub path ({error}); write it as hf://org/name, hf://org/name@revision or "
            "hf://org/name/subfolder."
        ) from None
    if parsed.type not in ("model", "dataset", "space"):
        raise SurgeonError(f"{uri}: surgeon reads model, dataset and space repositories, not {parsed.type}s.")
    for part, value in (("repository id", parsed.id), ("revision", parsed.revision), ("path", parsed.path_in_repo)):
        _check_part(uri, part, value or "")
    return HubPath(uri, parsed.id, parsed.type, parsed.revision, parsed.path_in_repo.strip("/"))


def _check_part(uri: str, part: str, value: str) -> None:
    """A part of a Hub path that the cache joins onto its own folders must stay inside them: no
    ``..``, no absolute path, no backslash (a Windows separator)."""
    if "\\" in value or value.startswith("/") or ".." in value.split("/"):
        raise SurgeonError(
            f"{uri}: the {part} {value!r} climbs out of the repository (.., an absolute path or a backslash); "
            "name a repository, revision and path inside it."
        )


def _inside(path: Path, root: Path, uri: str) -> Path:
    """``path``, once every symlink is resolved, if it lies in ``root`` (the repository's cache
    folder, whose snapshots link into its blobs); anything else is refused."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise SurgeonError(f"{uri}: {path} leads outside the repository's cache folder ({root}); refusing to read it.")
    return path


def _has_safetensors(files: list[str], folder: str) -> bool:
    prefix = f"{folder}/" if folder else ""
    return any(f.startswith(prefix) and f.endswith(".safetensors") for f in files)


def _listing(hub: HubPath) -> tuple[list[str] | None, bool]:
    """The repository's file list, which decides whether pickles and GGUF are needed, and whether
    the Hub answered at all. The list comes from the Hub (one request, no retries), else from the
    tree listing an earlier download cached, else None (then every candidate is asked for)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    reachable = not constants.HF_HUB_OFFLINE
    if reachable:
        try:
            info = huggingface_hub.HfApi().repo_info(hub.repo_id, repo_type=hub.repo_type, revision=hub.revision)
            return [s.rfilename for s in info.siblings or []], True
        except HfHubHTTPError:
            pass  # the Hub answered (missing, gated, ...): the download meets it again and reports it
        except Exception:  # no answer (refused, unresolvable, timed out): read the cache alone
            reachable = False
    try:
        tree = huggingface_hub.get_cached_repo_tree(hub.repo_id, repo_type=hub.repo_type, revision=hub.revision)
    except Exception:
        return None, reachable
    return [entry.path for entry in tree], reachable


def patterns(hub: HubPath, files: list[str] | None) -> tuple[list[str], list[str]]:
    """``allow_patterns`` and ``ignore_patterns`` for :func:`snapshot_download`."""
    if hub.names_file:
        return [hub.path_in_repo], []
    folder = hub.path_in_repo
    wanted = WANTED if files is not None and _has_safetensors(files, folder) else WANTED + ALTERNATES
    prefix = f"{folder}/" if folder else ""
    return [prefix + p for p in wanted], [prefix + p for p in TRAINING_STATE]


def _explain(hub: HubPath, error: Exception) -> SurgeonError:
    """The client's exception as one sentence that says what to do."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    uri = hub.uri
    has_token = huggingface_hub.get_token() is not None
    login = "log in with `hf auth login` (or set HF_TOKEN)"
    if isinstance(error, GatedRepoError):
        if has_token:
            return SurgeonError(
                f"{uri}: the repository is gated and your token has not been granted access; request it at "
                f"{hub.web_url} and retry once approved."
            )
        return SurgeonError(f"{uri}: the repository is gated; accept its conditions at {hub.web_url}, then {login}.")
    if isinstance(error, RepositoryNotFoundError):
        if has_token:
            return SurgeonError(
                f"{uri}: no such repository, or your token cannot read it; check the name and the token's permissions."
            )
        return SurgeonError(
            f"{uri}: no such repository, or it is private and no Hugging Face token was found; check the name, or "
            f"{login}."
        )
    if isinstance(error, RevisionNotFoundError):
        return SurgeonError(
            f"{uri}: the repository has no revision {hub.revision!r}; give an existing branch, tag or commit after '@'."
        )
    if isinstance(error, IncompleteSnapshotError):
        return SurgeonError(
            f"{uri}: the cached copy in {constants.HF_HUB_CACHE} is incomplete and the Hub cannot be reached; run "
            "again "
            "with network access (HF_HUB_OFFLINE unset)."
        )
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if constants.HF_HUB_OFFLINE:
            return SurgeonError(
                f"{uri}: not in the local Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
                "downloading "
                "it; unset HF_HUB_OFFLINE, or point HF_HOME at a cache that holds it."
            )
        return SurgeonError(
            f"{uri}: the Hub at {constants.ENDPOINT} cannot be reached and the repository is not in the local cache; "
            "check the network (or HF_ENDPOINT) and retry."
        )
    if isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code == 401:
        return SurgeonError(f"{uri}: the Hub rejected your token; {login} again with a valid token.")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "an error"
        return SurgeonError(
            f"{uri}: the Hub answered {status} ({str(error).splitlines()[0]}); retry later, or check {hub.web_url}."
        )
    return SurgeonError(f"{uri}: download failed ({type(error).__name__}: {error}); check the network and retry.")


def fetch(uri: str) -> Fetched:
    """Download (or find in the cache) what surgeon needs of ``uri``."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import filter_repo_objects

    hub = parse(uri)
    files, reachable = _listing(hub)
    allow, ignore = patterns(hub, files)
    try:
        snapshot = Path(
            huggingface_hub.snapshot_download(
                hub.repo_id,
                repo_type=hub.repo_type,
                revision=hub.revision,
                allow_patterns=allow,
                ignore_patterns=ignore,
                local_files_only=not reachable,
            )
        )
    except HFValidationError as error:
        raise SurgeonError(
            f"{uri}: {hub.repo_id!r} is not a valid repository id ({error}); write it as org/name."
        ) from None
    except OSError as error:  # the client's HTTP, cache and offline errors are all OSErrors
        raise _explain(hub, error) from None
    repository = snapshot.parent.parent  # models--org--name: its snapshots link into its blobs
    target = _inside(snapshot / hub.path_in_repo, repository, uri) if hub.path_in_repo else snapshot
    if not target.exists():
        where = f"{hub.path_in_repo!r} in {hub.repo_id}" if hub.path_in_repo else hub.repo_id
        raise SurgeonError(
            f"{uri}: found no file surgeon reads at {where}; check the path at "
            f"{hub.web_url}/tree/{hub.revision or 'main'}."
        )
    if target.is_file():
        return Fetched(target, snapshot.name, [target.name])
    # The snapshot folder is shared with every earlier download of this commit: list only what was asked for.
    present = [p.relative_to(snapshot).as_posix() for p in target.rglob("*") if p.is_file()]
    chosen = [
        p
        for p in filter_repo_objects(present, allow_patterns=allow, ignore_patterns=ignore)
        if _inside(snapshot / p, repository, uri)
    ]
    return Fetched(
        target, snapshot.name, sorted(str(PurePosixPath(p).relative_to(hub.path_in_repo or ".")) for p in chosen)
    )


def resolve_hf_path(uri: str) -> Path:
    """The local path of ``uri`` in the Hub cache, downloading what is missing."""
    return fetch(uri).path


def cached_config(repo_id: str) -> Path | None:
    """The ``config.json`` of Hub model ``repo_id`` as the local Hub cache holds it, never asking the
    network; None where the cache lacks it or ``repo_id`` is no repository id."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # huggingface_hub's HFValidationError: not a repository id
        return None
    return Path(cached) if isinstance(cached, str) else None


def recorded_config(origin: str | None) -> Path | None:
    """The ``config.json`` of the base an adapter recorded (``base_model_name_or_path``): in that
    local folder, or as the Hub cache holds it (never the network); None where neither has it."""
    if not origin:
        return None
    local = Path(origin) / "config.json"
    try:
        return local if local.is_file() else cached_config(origin)
    except OSError:  # a name too long or otherwise unusable as a path
        return None
