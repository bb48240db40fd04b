"""Resuming the Hub downloads that an interrupted pull left half done.

huggingface_hub (since it keeps a cached file listing per commit, `get_cached_repo_tree`)
downloads each file into a temporary file of that process, `blobs/<etag>.<random>.incomplete`,
resumes it itself only within that process (after a dropped connection), and deletes it when
the download fails; a pull stopped by Ctrl-C, or killed, leaves it behind. A new process would
start each such file from its first byte. `resume_partial_files` runs before a pull downloads:
it matches each partial file, by its etag, to a file of the revision last pulled (asking the Hub
for each file's metadata, as huggingface_hub does), downloads the rest of it only (an HTTP Range,
through huggingface_hub's own `http_get`), checks the whole file against its etag (the SHA-256
of an LFS file, the git SHA-1 of a small one) and moves it into `blobs/`, where
`snapshot_download` finds it done. A partial file that matches nothing, or fails the check, is
deleted: huggingface_hub would never use it. One that another process is writing (it holds
huggingface_hub's lock for the etag) is left alone.

Older huggingface_hub versions name the partial file `<etag>.incomplete` and resume it
themselves; there is nothing to do for them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


def resume_partial_files(repo_id: str, progress: Callable | None = None) -> int:
    """Finish the partial downloads of `repo_id` in the Hub cache; the bytes they already held
    (not downloaded again). Network errors stop it quietly: the pull that follows reports them."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # an older huggingface_hub, which resumes by itself
        return 0
    if constants.HF_HUB_OFFLINE:
        return 0
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    partials: dict[str, list[Path]] = {}
    for path in sorted((storage / "blobs").glob("*.incomplete")):
        partials.setdefault(path.name.split(".")[0], []).append(path)
    if not partials or not (storage / "refs" / "main").is_file():
        return 0
    commit = (storage / "refs" / "main").read_text().strip()
    try:
        tree = get_cached_repo_tree(repo_id, revision=commit)
    except CachedRepoTreeNotFoundError:  # no listing: nothing to match the files with
        return 0
    reused = 0
    locks = storage.parent / ".locks" / storage.name
    files = _FileMatcher(repo_id, commit, tree)
    for etag, paths in partials.items():
        reused += _resume(etag, paths, storage / "blobs" / etag, locks / f"{etag}.lock", files,
                          progress)
    return reused


class _FileMatcher:
    """Which file of the commit an etag is: its metadata, asked of the Hub once per file."""

    def __init__(self, repo_id: str, commit: str, tree: list):
        self.repo_id, self.commit, self.tree = repo_id, commit, tree
        self.metadata: dict[str, object] = {}

    def find(self, etag: str, at_least: int):
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        for f in self.tree:
            if f.size is None or f.size < at_least:
                continue
            if f.path not in self.metadata:
                url = hf_hub_url(self.repo_id, f.path, revision=self.commit)
                self.metadata[f.path] = (url, get_hf_file_metadata(url))
            url, meta = self.metadata[f.path]
            if meta.etag == etag:
                return f.path, url, meta
        return None


def _resume(etag: str, paths: list[Path], blob: Path, lock_path: Path, files: _FileMatcher,
            progress: Callable | None) -> int:
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(str(lock_path), timeout=0)
        lock.acquire()
    except Timeout:
        return 0  # another process is downloading this file right now
    try:
        paths = sorted(paths, key=lambda p: p.stat().st_size, reverse=True)
        keep, extra = paths[0], paths[1:]
        for path in extra:
            path.unlink(missing_ok=True)
        if blob.exists():
            keep.unlink(missing_ok=True)
            return 0
        size = keep.stat().st_size
        try:
            found = files.find(etag, size)
        except _network_errors():
            return 0  # the Hub cannot be asked now: keep the partial file for the next pull
        if found is None:
            keep.unlink()
            return 0
        name, url, meta = found
        try:
            _download_rest(keep, name, url, meta, size, progress)
        except _network_errors():
            return 0  # what came is kept, for the next pull
        if not _matches(keep, etag, meta.size):
            keep.unlink()
            return 0
        os.chmod(keep, 0o644)
        os.replace(keep, blob)
        return size
    finally:
        lock.release()


def _network_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's HTTP errors (its HfHubHTTPError is one), and the system's."""
    from huggingface_hub.errors import HfHubHTTPError

    bases: tuple[type[BaseException], ...] = (HfHubHTTPError, OSError)
    for module in ("httpx2", "httpx"):
        try:
            return (*bases, __import__(module).HTTPError)
        except ImportError:
            continue
    return bases


def _download_rest(path: Path, name: str, url: str, meta, size: int,
                   progress: Callable | None) -> None:
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    location = meta.location or url
    if urlparse(location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # a signed CDN URL takes no token
    if meta.size is not None and size >= meta.size:
        return
    with path.open("ab") as f:
        http_get(location, f, resume_size=size, headers=headers, expected_size=meta.size,
                 displayed_filename=name, tqdm_class=progress)


def _matches(path: Path, etag: str, size: int | None) -> bool:
    """The whole file against its etag: SHA-256 (LFS) or git's SHA-1 of a blob."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return False
    if _SHA256.fullmatch(etag):
        digest = hashlib.sha256()
    elif _SHA1.fullmatch(etag):
        digest = hashlib.sha1(f"blob {actual}\0".encode())
    else:
        return size is not None
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest() == etag
