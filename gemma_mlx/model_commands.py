"""`gemma-mlx pull`, `list` (`ls`), `rm` and `ps`: the models on this machine, and what a
running server has loaded. The tables go to stdout, notes and progress bars to stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from datetime import datetime, timezone
from typing import Any

from .errors import BadRequest, ServerNotFound
from .hub import DEFAULT_MODEL, MODEL_NAMES, PYPI_270M
from .interrupt import Interrupt
from .models import InstalledModel, format_size

EXIT_INTERRUPTED = 130


def pull_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gemma-mlx pull",
        description="Download a model from the Hugging Face Hub, or import a .gguf file, so "
                    "that it loads at once and without a connection. Pulling again fetches "
                    "what is new or missing; an interrupted pull resumes where it stopped.")
    parser.add_argument("model", help=f"{', '.join(MODEL_NAMES)}, a Hub repo id (org/name) or "
                                      f"a .gguf file")
    parser.add_argument("--mmproj", metavar="MMPROJ.gguf", default=None,
                        help="llama.cpp's vision projector GGUF, imported with a .gguf model "
                             "so that it sees images")
    args = parser.parse_args(argv)
    model = _interruptible_pull(args.model, args.mmproj)
    vision = ", sees images" if model.vision else ""
    print(f"pulled {model.name} ({format_size(model.size)}, {model.quantization}{vision}): "
          f"`gemma-mlx run {model.name}` chats with it", file=sys.stderr)
    return 0


def _interruptible_pull(name: str, mmproj: str | None) -> InstalledModel:
    """`models.pull`, stopped at once by Ctrl-C. The downloads (`fetch`) run in a thread:
    huggingface_hub's pool waits for its download threads, which notice nothing before their
    next chunk (up to 10 MB away), and deletes the partial file of a download that fails; so on
    Ctrl-C the process ends under them, and the partial files stay for the next pull to resume
    (hub_resume.py). An import (`finish_pull`) runs here, where Ctrl-C unwinds it and its
    staging folder goes."""
    from huggingface_hub.utils import tqdm

    from .models import fetch, finish_pull

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            fetch(name, mmproj, progress=tqdm)
        except BaseException as e:  # handed to the main thread, which raises it
            outcome["error"] = e

    thread = threading.Thread(target=work, name="pull", daemon=True)
    with Interrupt().installed():
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.1)
        except KeyboardInterrupt:
            print(f"\ninterrupted: `gemma-mlx pull {name}` again resumes where it stopped",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        if "error" in outcome:
            raise outcome["error"]
        return finish_pull(name, mmproj, progress=tqdm)


def list_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gemma-mlx list",
        description="The models on this machine that gemma-mlx can load: the Hugging Face "
                    "cache's Gemma 3 repos, imported GGUFs and folders made by `convert`.")
    parser.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    args = parser.parse_args(argv)
    from .models import installed_models

    models = installed_models()
    if args.json:
        print(json.dumps([m.to_json() for m in models], indent=2))
        return 0
    if not models:
        print(f"no models yet: `gemma-mlx pull {PYPI_270M}` (or {DEFAULT_MODEL}, ...) fetches "
              "one", file=sys.stderr)
        return 0
    now = datetime.now(timezone.utc)
    rows = [("NAME", "SOURCE", "SIZE", "QUANTIZATION", "IMAGES", "LAST USED")]
    rows += [(m.name, m.source, _size_cell(m), m.quantization, "yes" if m.vision else "no",
              ago(m.last_used, now)) for m in models]
    print(table(rows))
    return 0


def _size_cell(model: InstalledModel) -> str:
    size = format_size(model.size)
    if not model.complete:
        return f"{size} (partial: pull again)"
    return size if model.path is not None else f"{size} (not imported: pull again)"


def rm_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gemma-mlx rm",
        description="Delete models that `gemma-mlx list` shows: their Hugging Face cache "
                    "entries and gemma-mlx's own folders for them, nothing else.")
    parser.add_argument("models", nargs="+", metavar="MODEL", help="a name `list` shows")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask first")
    args = parser.parse_args(argv)
    from .models import find, remove

    chosen = list({m.places: m for m in map(find, args.models)}.values())
    for model in chosen:
        where = ", ".join(str(p) for p in model.places)
        print(f"{model.name}: {format_size(model.size)} in {where}", file=sys.stderr)
    if not args.yes and not _confirm(chosen):
        raise BadRequest("nothing deleted: answer y to delete, or pass -y")
    for model in chosen:
        freed = remove(model)
        note = (" (the PyPI package stays installed: `gemma-mlx pull 270m` imports it again)"
                if model.kind == "pypi" else "")
        print(f"deleted {model.name}: {format_size(freed)} freed{note}", file=sys.stderr)
    return 0


def _confirm(models: list[InstalledModel]) -> bool:
    total = format_size(sum(m.size for m in models))
    what = models[0].name if len(models) == 1 else f"these {len(models)} models"
    print(f"delete {what} ({total})? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not sys.stdin.isatty() or not answer.endswith("\n"):
        print(file=sys.stderr)  # no echo of the answer ended the question's line
    return answer.strip().lower() in ("y", "yes")


def ps_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gemma-mlx ps",
        description="What a running gemma-mlx server has loaded (its /api/ps), how much "
                    "memory it takes and until when it stays loaded.")
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="its port (default: 8080)")
    parser.add_argument("--api-key", default=os.environ.get("GEMMA_MLX_API_KEY"),
                        help="the server's --api-key (default: $GEMMA_MLX_API_KEY)")
    parser.add_argument("--json", action="store_true", help="the server's answer as it is")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise BadRequest(f"--port is out of range (got {args.port})")
    answer = server_ps(args.host, args.port, args.api_key)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    now = datetime.now(timezone.utc)
    rows = [("NAME", "MEMORY", "CONTEXT", "UNTIL")]
    for m in answer.get("models") or []:
        rows.append((str(m.get("name") or m.get("model")),
                     format_size(int(m.get("size_vram") or m.get("size") or 0)),
                     str(m.get("context_length", "")), until(m.get("expires_at"), now)))
    print(table(rows))
    return 0


def server_ps(host: str, port: int, api_key: str | None = None) -> dict[str, Any]:
    """GET /api/ps from the server at host:port, or a one-line error that says why not."""
    import urllib.error
    import urllib.request

    where = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    request = urllib.request.Request(where + "/api/ps")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise BadRequest(f"the server on {where} wants an API key: pass --api-key (or set "
                             "GEMMA_MLX_API_KEY)") from e
        raise ServerNotFound(f"{where} answered {e.code} to /api/ps: is it a gemma-mlx "
                             "server? (--host/--port)") from e
    except (urllib.error.URLError, OSError) as e:
        raise ServerNotFound(f"no server answers on {where}: start one with `gemma-mlx serve`,"
                             " or point --host/--port at it") from e
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ServerNotFound(f"{where} did not answer /api/ps with JSON: is it a gemma-mlx "
                             "server? (--host/--port)")
    return answer


# ---- formatting ----------------------------------------------------------------------------

def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def ago(t: datetime | None, now: datetime) -> str:
    """'never', 'just now', '5 minutes ago', '3 days ago'."""
    if t is None:
        return "never"
    return _span((now - t).total_seconds(), "{} ago", "just now")


def until(expires_at: str | None, now: datetime) -> str:
    """When a loaded model is unloaded: 'in 4 minutes', or 'forever' (beyond a year)."""
    try:
        t = datetime.fromisoformat(str(expires_at).replace("Z", "+00:00"))
    except ValueError:
        return str(expires_at or "")
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    seconds = (t - now).total_seconds()
    if seconds > 365 * 86400:
        return "forever"
    return _span(seconds, "in {}", "now")


def _span(seconds: float, form: str, instant: str) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count = int(seconds // size)
        if count >= 1:
            return form.format(f"{count} {unit}{'s' if count > 1 else ''}")
    return instant
