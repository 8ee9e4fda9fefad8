"""A stand-in for the Hugging Face Hub on 127.0.0.1, just large enough for huggingface_hub 2.4's
real client to download (``snapshot_download``) and upload (``create_repo``, ``create_branch``,
``create_commit``) through it, so the tests exercise surgeon's Hub code end to end without network.

Point a process at it with ``HF_ENDPOINT=<server.url>`` *before* huggingface_hub is imported (the
client reads its environment at import), i.e. run the command under test in a subprocess.

Routes, as huggingface_hub 2.4 calls them (``{t}`` is ``model``/``dataset``/``space``; the revision
is URL-quoted, so ``refs/pr/1`` arrives as one segment):

    GET  /api/{t}s/{org}/{name}/revision/{rev}          repo_info: {"id", "sha", "siblings", ...}
    GET  /api/{t}s/{org}/{name}/tree/{rev}[/{path}]     list_repo_tree: [{"type": "file", "path", "size", "oid"}]
    HEAD /[{t}s/]{org}/{name}/resolve/{rev}/{path}       file metadata: X-Repo-Commit, ETag, Content-Length
    GET  /[{t}s/]{org}/{name}/resolve/{rev}/{path}       file bytes
    POST /api/repos/create                               {"url"}; 409 when it exists (exist_ok handles it)
    POST /api/{t}s/{org}/{name}/branch/{branch}          create_branch from main; 409 when it exists
    POST /api/validate-yaml                              parses the README front matter as YAML
    POST /api/{t}s/{org}/{name}/preupload/{rev}          every file "regular" (base64 in the commit: no LFS, no Xet)
    POST /api/{t}s/{org}/{name}/commit/{rev}[?create_pr=1]  NDJSON header + files;
                                                         {"commitUrl", "commitOid", "pullRequestUrl"}

Errors carry the ``X-Error-Code`` header the client maps to its exception types (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo). Writes need an ``Authorization: Bearer`` header; a
gated repo serves files only to the tokens in ``Repo.granted``. Every request is appended to
``server.log`` as ``(method, path, token)`` so a test can check what was fetched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_id(data: bytes) -> str:
    """The git object id of a file, which the Hub reports as a file's ``oid`` and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_type: str = "model"
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> the whole tree at that commit
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> sha
    messages: dict[str, str] = field(default_factory=dict)  # sha -> commit summary

    def commit(self, files: dict[str, bytes], ref: str = "main", message: str = "initial commit") -> str:
        parent = self.commits.get(self.refs.get(ref, ""), {})
        tree = {**parent, **files}
        sha = hashlib.sha1(json.dumps([ref, message, len(self.commits), sorted(tree)]).encode()).hexdigest()
        self.commits[sha] = tree
        self.refs[ref] = sha
        self.messages[sha] = message
        return sha

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return self.commits[self.resolve(revision)]


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class HubServer:
    """The fake Hub: ``repos`` maps ``org/name`` to :class:`Repo`. Use as a context manager."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], **options) -> Repo:
        repo = self.repos[repo_id] = Repo(**options)
        repo.commit(files)
        return repo

    def downloads(self) -> list[str]:
        """Paths of the files whose bytes were sent (GET on resolve), in order."""
        return [
            path.split("/resolve/", 1)[1].split("/", 1)[1]
            for method, path, _ in self.log
            if method == "GET" and "/resolve/" in path
        ]

    # -- request handling -------------------------------------------------------------------------

    def _repo(self, repo_id: str, token: str | None, repo_type: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or repo.repo_type != repo_type or (repo.private and token is None):
            raise _Error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _sha(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def handle(self, method: str, raw_path: str, token: str | None, body: bytes) -> tuple[int, dict, bytes]:
        split = urlsplit(raw_path)
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        if parts[0] == "api":
            return self._api(method, parts[1:], query, token, body)
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), token, repo_type)
        raise _Error(404, None, f"no route for {method} {split.path}")

    def _resolve(self, method: str, repo_id: str, revision: str, path: str, token: str | None, repo_type: str):
        repo = self._repo(repo_id, token, repo_type)
        if repo.gated and token not in repo.granted:
            raise _Error(401 if token is None else 403, "GatedRepo", f"Access to model {repo_id} is restricted.")
        sha = self._sha(repo, revision)
        data = repo.commits[sha].get(path)
        if data is None:
            raise _Error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"', "Content-Length": str(len(data))}
        return 200, headers, b"" if method == "HEAD" else data

    def _api(self, method: str, parts: list[str], query: dict, token: str | None, body: bytes):
        if method == "POST" and parts == ["repos", "create"]:
            return self._create(json.loads(body), token)
        if method == "POST" and parts == ["validate-yaml"]:
            content = json.loads(body)["content"]
            front = content.split("---", 2)[1] if content.startswith("---") else ""
            try:
                found = yaml.safe_load(front) or {}
                errors = [] if isinstance(found, dict) else [{"message": "metadata is not a mapping"}]
            except yaml.YAMLError as error:
                errors = [{"message": str(error)}]
            return (400 if errors else 200), {}, json.dumps({"errors": errors, "warnings": []}).encode()
        if len(parts) < 5 or parts[0] not in ("models", "datasets", "spaces"):
            raise _Error(404, None, f"no API route /api/{'/'.join(parts)}")
        repo_type, repo_id, action, revision, rest = (
            parts[0][:-1],
            f"{parts[1]}/{parts[2]}",
            parts[3],
            parts[4],
            parts[5:],
        )
        repo = self._repo(repo_id, token, repo_type)
        if method == "GET" and action == "revision":
            sha = self._sha(repo, revision)
            siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
            info = {
                "id": repo_id,
                "sha": sha,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "siblings": siblings,
            }
            return 200, {}, json.dumps(info).encode()
        if method == "GET" and action == "tree":
            prefix = "/".join(rest)
            tree = repo.commits[self._sha(repo, revision)]
            listing = [
                {"type": "file", "path": p, "size": len(d), "oid": git_blob_id(d)}
                for p, d in sorted(tree.items())
                if not prefix or p.startswith(prefix + "/")
            ]
            return 200, {}, json.dumps(listing).encode()
        if token is None:
            raise _Error(401, None, "You must be authenticated to write")
        if method == "POST" and action == "branch":
            if revision in repo.refs:
                raise _Error(409, None, f"Branch {revision} already exists")
            repo.refs[revision] = repo.refs["main"]
            return 200, {}, b"{}"
        if method == "POST" and action == "preupload":
            tree = repo.commits.get(repo.resolve(revision) or "", {})
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_id(tree[f["path"]]) if f["path"] in tree else None,
                }
                for f in json.loads(body)["files"]
            ]
            return 200, {}, json.dumps({"files": files}).encode()
        if method == "POST" and action == "commit":
            return self._commit(repo, repo_id, revision, query.get("create_pr") == "1", body)
        raise _Error(404, None, f"no API route {method} /api/{'/'.join(parts)}")

    def _create(self, payload: dict, token: str | None):
        if token is None:
            raise _Error(401, None, "You must be authenticated to create a repository")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise _Error(409, None, "You already created this model repo", url=url)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.add_repo(
            repo_id,
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
            repo_type=payload.get("type") or "model",
            private=private,
        )
        return 200, {}, json.dumps({"url": url, "name": repo_id, "id": repo_id}).encode()

    def _commit(self, repo: Repo, repo_id: str, revision: str, create_pr: bool, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = {}
        for item in lines:
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                raise _Error(400, None, f"this test server takes only regular files, not {item['key']}")
        base_sha = self._sha(repo, revision)
        reply = {}
        if create_pr:
            number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
            ref = f"refs/pr/{number}"
            repo.refs[ref] = base_sha
            reply["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{number}"
        else:
            ref = revision if revision in repo.refs else next(r for r, s in repo.refs.items() if s == base_sha)
        sha = repo.commit(files, ref, header["summary"])
        reply.update(commitUrl=f"{self.url}/{repo_id}/commit/{sha}", commitOid=sha)
        return 200, {}, json.dumps(reply).encode()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ").strip() or None
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.log.append((self.command, urlsplit(self.path).path, token))
                try:
                    status, headers, payload = server.handle(self.command, self.path, token, body)
                except _Error as error:
                    status, payload = error.status, json.dumps({"error": error.message, **error.extra}).encode()
                    headers = {"X-Error-Message": error.message, **({"X-Error-Code": error.code} if error.code else {})}
                self.send_response(status)
                headers.setdefault("Content-Length", str(len(payload)))
                headers.setdefault("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = _serve

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        return Handler


if __name__ == "__main__":  # a manual check: python tests/hub_server.py, then HF_ENDPOINT=<url> surgeon pull ...
    import sys
    import time
    from pathlib import Path

    with HubServer() as hub:
        for folder in sys.argv[1:]:
            hub.add_repo(
                f"local/{Path(folder).name}", {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
            )
        print(f"HF_ENDPOINT={hub.url}  repos: {', '.join(hub.repos) or '(none; pass folders)'}", flush=True)
        while True:
            time.sleep(3600)
