"""Hugging Face Hub test doubles: a fake Hub over HTTP on 127.0.0.1, which the real
huggingface_hub downloads from (HF_ENDPOINT), and Hub cache folders written as huggingface_hub
writes them (models--org--name/{blobs,snapshots/<commit>,refs/main}).

The server answers the routes `snapshot_download` and `hf_hub_download` use: the revision's info,
the file tree, and each file (HEAD, and GET with Range, as a resumed download asks). A file can
be made to trickle after its first bytes, so that a test can interrupt a pull midway; every
request is logged with its Range header."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def commit_of(files: dict[str, bytes], salt: str = "") -> str:
    digest = hashlib.sha1(salt.encode())
    for name in sorted(files):
        digest.update(name.encode() + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


LFS_FROM = 1 << 20  # files this big are LFS files, as the Hub stores weights


def git_oid(content: bytes) -> str:
    return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()


def etag_of(content: bytes) -> str:
    """The Hub's etag, which names the blob: an LFS file's SHA-256, else its git object id."""
    return hashlib.sha256(content).hexdigest() if len(content) >= LFS_FROM else git_oid(content)


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, range
    trickle: dict[str, int] = field(default_factory=dict)  # file -> bytes sent at full speed
    sent: dict[str, int] = field(default_factory=dict)  # file -> body bytes sent so far
    url: str = ""

    def add(self, repo_id: str, files: dict[str, bytes]) -> str:
        self.repos[repo_id] = Repo(files, commit_of(files, repo_id))
        return self.repos[repo_id].commit

    def ranges(self, filename: str) -> list[str | None]:
        return [r for method, path, r in self.requests
                if method == "GET" and path.endswith("/" + filename)]

    def serve(self) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                try:
                    if parts[0] == "api" and parts[1] == "models":
                        self._api(parts[2:])
                    elif len(parts) >= 5 and parts[2] == "resolve":
                        self._file("/".join(parts[:2]), "/".join(parts[4:]), head)
                    else:
                        self._error(404, "EntryNotFound", "no such route")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _api(self, parts: list[str]) -> None:
                repo_id = "/".join(parts[:2])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                if parts[2] == "revision":
                    return self._json({"_id": repo.commit, "id": repo_id, "modelId": repo_id,
                                       "sha": repo.commit, "private": False, "gated": False,
                                       "disabled": False, "tags": [], "downloads": 0,
                                       "likes": 0, "lastModified": "2025-03-12T00:00:00.000Z",
                                       "siblings": [{"rfilename": f} for f in repo.files]})
                if parts[2] == "tree":
                    return self._json([
                        {"type": "file", "path": name, "size": len(content),
                         "oid": git_oid(content),
                         **({"lfs": {"oid": etag_of(content), "size": len(content),
                                     "pointerSize": 134}} if len(content) >= LFS_FROM else {})}
                        for name, content in sorted(repo.files.items())])
                self._error(404, "EntryNotFound", "no such route")

            def _file(self, repo_id: str, filename: str, head: bool) -> None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                if filename not in repo.files:
                    return self._error(404, "EntryNotFound", f"{filename} not found")
                content = repo.files[filename]
                start = 0
                asked = self.headers.get("Range")
                if asked and not head:
                    start = int(asked.split("=")[1].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", f'"{etag_of(content)}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(content) - start))
                if start:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.end_headers()
                if not head:
                    self._body(filename, content[start:])

            def _body(self, filename: str, body: bytes) -> None:
                fast = hub.trickle.get(filename, len(body))
                self.wfile.write(body[:fast])
                hub.sent[filename] = hub.sent.get(filename, 0) + min(fast, len(body))
                for at in range(fast, len(body), 1 << 16):
                    time.sleep(0.05)
                    piece = body[at:at + (1 << 16)]
                    self.wfile.write(piece)
                    hub.sent[filename] += len(piece)

            def _json(self, value) -> None:
                body = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":  # a HEAD answer has no body: bytes sent anyway
                    self.wfile.write(body)  # would be read as the next answer's status line

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def write_cached_repo(cache: Path, repo_id: str, files: dict[str, bytes],
                      commit: str | None = None, ref: str | None = "main") -> Path:
    """A repo in a Hub cache folder as huggingface_hub writes it: each file once in blobs/
    (named by its etag), linked from snapshots/<commit>/ by a relative symlink, and
    refs/<ref> holding the commit. Another commit of the same repo shares the blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit or commit_of(files, repo_id)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        blob = repo / "blobs" / etag_of(content)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
