"""A local stand-in for the Hugging Face hub: serves folders as model repos over the endpoints huggingface_hub uses
(model info, tree, resolve with HEAD/ETag/Range), with missing, gated and connection-dropping cases for tests."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# Files the hub stores with Git LFS (and describes with an lfs sha256): weights, as on the real hub.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".ckpt", ".onnx", ".msgpack", ".png")


@dataclass(frozen=True)
class RepoFile:
    path: str
    data: bytes
    git_oid: str  # the git blob sha1: the ETag of a file not in LFS
    sha256: str | None  # set for LFS files: their ETag and lfs oid

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_oid

    def entry(self) -> dict[str, Any]:
        """The file as `/api/models/{repo}?blobs=true` lists it."""
        sibling: dict[str, Any] = {"rfilename": self.path, "size": len(self.data), "blobId": self.git_oid}
        if self.sha256:
            sibling["lfs"] = {"sha256": self.sha256, "size": len(self.data), "pointerSize": 134}
        return sibling


@dataclass
class Repo:
    repo_id: str
    files: dict[str, RepoFile]
    commit: str
    gated_token: str | None = None  # a gated repo serves files only to this token

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, gated_token: str | None = None) -> Repo:
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            sha256 = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else None
            files[name] = RepoFile(name, data, git_oid, sha256)
        commit = hashlib.sha1(
            repo_id.encode() + b"".join(f.etag.encode() for f in files.values())
        ).hexdigest()
        return cls(repo_id, files, commit, gated_token)


@dataclass
class FakeHub:
    """The server's state: its repos, what it served, and the faults to inject next."""

    repos: dict[str, Repo] = field(default_factory=dict)
    served: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, file) → body bytes sent
    ranges: list[tuple[str, str, str]] = field(default_factory=list)  # (repo, file, Range header) of GETs
    drops: dict[tuple[str, str], int] = field(default_factory=dict)  # cut the next GET after N bytes
    holds: dict[tuple[str, str], threading.Event] = field(default_factory=dict)  # GETs wait for the event
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo_id: str, folder: Path, *, gated_token: str | None = None) -> Repo:
        repo = Repo.from_folder(repo_id, folder, gated_token)
        self.repos[repo_id] = repo
        return repo

    def drop_after(self, repo_id: str, filename: str, nbytes: int) -> None:
        """The next GET of this file sends `nbytes` of its body, then the connection is cut (once)."""
        self.drops[(repo_id, filename)] = nbytes

    def hold(self, repo_id: str, filename: str) -> threading.Event:
        """GETs of this file send half their body, then wait until the returned event is set."""
        event = self.holds[(repo_id, filename)] = threading.Event()
        return event

    def reset_counts(self) -> None:
        with self.lock:
            self.served.clear()
            self.ranges.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the library's connection pool expects
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    # -- routing -----------------------------------------------------------------------------------------
    def _route(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2:])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head=head)
        else:
            self._error(404, "EntryNotFound", f"no route {path}")

    def _repo(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", commit=None)
            return None
        return repo

    def _api(self, parts: list[str]) -> None:
        """/api/models/{org}/{name}[/revision/{rev}] and /api/models/{org}/{name}/tree/{rev}[/{path}]."""
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        if not rest or rest[0] == "revision":
            repo = self._repo(repo_id, rest[1] if len(rest) > 1 else "main")
            if repo is not None:
                self._json(
                    {
                        "_id": repo.commit[:24],
                        "id": repo.repo_id,
                        "modelId": repo.repo_id,
                        "sha": repo.commit,
                        "private": False,
                        "disabled": False,
                        # Like the hub, a gated repo's metadata is public; its files are not.
                        "gated": "manual" if repo.gated_token else False,
                        "library_name": "diffusers",
                        "tags": ["diffusers"],
                        "siblings": [f.entry() for f in repo.files.values()],
                    },
                    repo,
                )
        elif rest[0] == "tree" and len(rest) >= 2:
            repo = self._repo(repo_id, rest[1])
            if repo is not None:
                self._json(self._tree(repo, "/".join(rest[2:])), repo)
        else:
            self._error(404, "EntryNotFound", "unknown api route")

    def _tree(self, repo: Repo, prefix: str) -> list[dict[str, Any]]:
        """The recursive tree listing, with sizes and lfs oids (`list_repo_tree(recursive=True)`)."""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for f in repo.files.values():
            if prefix and not f.path.startswith(prefix.rstrip("/") + "/"):
                continue
            parent = f.path.rsplit("/", 1)[0] if "/" in f.path else ""
            if parent and parent not in folders:
                folders.add(parent)
                entries.append({"type": "directory", "oid": repo.commit, "size": 0, "path": parent})
            entry: dict[str, Any] = {"type": "file", "oid": f.git_oid, "size": len(f.data), "path": f.path}
            if f.sha256:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        return entries

    def _resolve(self, repo_id: str, revision: str, filename: str, *, head: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        if repo.gated_token is not None:
            sent = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not sent:
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                    commit=repo.commit,
                )
                return
            if sent != repo.gated_token:
                self._error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                    f"Visit {self.hub.url}/{repo_id} to ask for access.",
                    commit=repo.commit,
                )
                return
        file = repo.files.get(filename)
        if file is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist", commit=repo.commit)
            return
        self._send_file(repo, file, head=head)

    def _send_file(self, repo: Repo, file: RepoFile, *, head: bool) -> None:
        size = len(file.data)
        start = 0
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and not head:
            start = int(range_header[len("bytes=") :].split("-", 1)[0] or 0)
        with self.hub.lock:
            if not head:
                self.hub.ranges.append((repo.repo_id, file.path, range_header or ""))
            drop = None if head else self.hub.drops.pop((repo.repo_id, file.path), None)
        if start >= size and size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{file.etag}"')
        self.send_header("X-Repo-Commit", repo.commit)
        if file.sha256:
            # LFS files: the hub names their blob by the sha256 (X-Linked-Etag) and size (X-Linked-Size). No
            # X-Xet-Hash header and no xet Link: the library downloads over plain HTTP.
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if head:
            return
        body = file.data[start:]
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self._count(repo, file, min(drop, len(body)))
            # An abrupt end mid-body: the client sees fewer bytes than Content-Length promised.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        hold = None if head else self.hub.holds.get((repo.repo_id, file.path))
        if hold is not None:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            hold.wait(timeout=60)
            body = body[len(body) // 2 :]
        self.wfile.write(body)
        self._count(repo, file, len(body))

    # -- answers -----------------------------------------------------------------------------------------
    def _count(self, repo: Repo, file: RepoFile, nbytes: int) -> None:
        with self.hub.lock:
            key = (repo.repo_id, file.path)
            self.hub.served[key] = self.hub.served.get(key, 0) + nbytes

    def _json(self, payload: Any, repo: Repo) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", repo.commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, *, commit: str | None = None) -> None:
        """The hub's error answer: the library picks its exception from X-Error-Code."""
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@contextmanager
def serve_fake_hub() -> Iterator[FakeHub]:
    """A FakeHub on a free loopback port, in a background thread, for the duration of the block."""
    hub = FakeHub()
    handler = type("FakeHubHandler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def tiny_pipeline_folder(base: Path) -> Path:
    """The tiny random FLUX pipeline saved as a diffusers folder (safetensors) under `base`, built once: modules
    sharing a session's temporary folder reuse it."""
    folder = base / "tiny-flux-pipeline"
    if not (folder / "model_index.json").exists():
        from diffuserve.models.tiny_flux import build_tiny_flux

        build_tiny_flux(seed=0).save_pretrained(folder)
    return folder
