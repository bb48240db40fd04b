"""A server of the models on this machine: `serve` without --model loads what `gemma-mlx list`
shows on demand, keeps it for its keep-alive, makes room for another, and never loads or
downloads anything else unless started with --allow-pull.

Real server processes on 127.0.0.1, driven by the official `openai` and `ollama` clients and
raw HTTP, over a gemma-mlx cache holding two tiny random models (their replies are gibberish:
only mechanics are asserted) and, for --allow-pull, a fake Hub on 127.0.0.1.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from checkpoints import write_tiny_checkpoint
from fake_hub import FakeHub
from servers import running_server

POLL_S = 0.3


def eventually(check, timeout: float = 60.0):
    """`check()`'s first truthy value, polled for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"not within {timeout:.0f} s")


def environment(tmp: Path, hub_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "GEMMA_MLX_CACHE"}
    env.update(HF_HOME=str(tmp / "hf"), GEMMA_MLX_CACHE=str(tmp / "gemma_mlx"),
               HF_HUB_DISABLE_TELEMETRY="1")
    if hub_url is None:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = hub_url
    return env


@pytest.fixture(scope="module")
def cache(tmp_path_factory, folder_270m) -> Path:
    """A gemma-mlx cache whose models folder holds two tiny models (as `convert --name` makes
    them): tiny-a sees images, tiny-b is text only."""
    root = tmp_path_factory.mktemp("machine")
    models = root / "gemma_mlx" / "models"
    write_tiny_checkpoint(models / "tiny-a", folder_270m, sliding_window=128)
    write_tiny_checkpoint(models / "tiny-b", folder_270m, vision=False, seed=1,
                          sliding_window=128)
    return root


@pytest.fixture(scope="module")
def server(cache):
    with running_server("--keep-alive", "60s", "--max-loaded", "1",
                        env=environment(cache)) as running:
        yield running


def loaded(server) -> list[str]:
    return [m.model for m in ollama.Client(host=server.url).ps().models]


def test_lists_every_model_on_the_machine_and_loads_none_at_start(server):
    names = {m.model for m in ollama.Client(host=server.url).list().models}
    assert names == {"tiny-a", "tiny-b"}
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    assert {"tiny-a", "tiny-b"} <= {m.id for m in client.models.list().data}
    assert loaded(server) == []


def test_loads_on_demand_and_keeps_answering_while_it_switches(server):
    """--max-loaded 1: a request for tiny-b while tiny-a streams waits for tiny-a's stream to
    end, then tiny-a goes and tiny-b comes; the stream is whole and the server answers
    throughout."""
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)
    stream = client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "Count."}], max_tokens=120,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [next(stream)]  # tiny-a is loaded and streaming
    assert loaded(server) == ["tiny-a"]
    other: dict = {}

    def ask_tiny_b() -> None:
        other["reply"] = ollama.Client(host=server.url, timeout=300).generate(
            model="tiny-b", prompt="Hello", options={"num_predict": 4})

    thread = threading.Thread(target=ask_tiny_b)
    thread.start()
    health = []
    for chunk in stream:
        chunks.append(chunk)
        if len(health) < 5:
            health.append(httpx.get(server.url + "/health", timeout=30).status_code)
    thread.join(300)
    assert chunks[-1].usage.completion_tokens == 120  # the stream ran to its end
    assert health == [200] * len(health) and health
    assert other["reply"].done and other["reply"].eval_count == 4
    assert loaded(server) == ["tiny-b"]


def test_a_model_goes_after_its_keep_alive(server):
    client = ollama.Client(host=server.url, timeout=300)
    reply = client.generate(model="tiny-a", prompt="Hi", options={"num_predict": 2},
                            keep_alive="2s")
    assert reply.done
    assert loaded(server) == ["tiny-a"]
    eventually(lambda: loaded(server) == [])
    assert server.metric("gemma_mlx_loaded_models") == 0


def test_ollama_loads_and_unloads_without_a_prompt(server):
    client = ollama.Client(host=server.url, timeout=300)
    assert client.generate(model="tiny-b").done_reason == "load"
    running = client.ps().models
    assert [m.model for m in running] == ["tiny-b"] and running[0].size_vram > 0
    assert client.generate(model="tiny-b", keep_alive=0).done_reason == "unload"
    eventually(lambda: loaded(server) == [])
    assert client.chat(model="tiny-a", messages=[], keep_alive=0).done_reason == "unload"
    assert loaded(server) == []  # unloading a model that is not loaded loads nothing


def test_refuses_paths_models_it_does_not_list_and_pulls(server, cache):
    folder = str(cache / "gemma_mlx" / "models" / "tiny-a")  # on disk, but named by a path
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    for name in (folder, "4b", "../tiny-a"):
        with pytest.raises(openai.NotFoundError) as error:
            client.chat.completions.create(model=name, max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert "--allow-pull" in error.value.body["message"]
    talk = ollama.Client(host=server.url)
    with pytest.raises(ollama.ResponseError) as error:
        talk.pull("4b")
    assert error.value.status_code == 403 and "--allow-pull" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        talk.delete("tiny-a")
    assert error.value.status_code == 403
    bad = httpx.post(server.url + "/api/generate", timeout=30,
                     json={"model": "tiny-a", "prompt": "Hi", "keep_alive": "soon"})
    assert bad.status_code == 400 and "keep_alive 'soon' is not a duration" in bad.json()["error"]
    assert loaded(server) == [] or "tiny-a" not in loaded(server)[1:]
    assert (cache / "gemma_mlx" / "models" / "tiny-a").is_dir()


def test_with_allow_pull_a_request_pulls_and_the_api_pulls_and_deletes(tmp_path, cache):
    """--allow-pull: Ollama's pull and delete work, and a request may name a repo id not on
    this machine yet; a path stays refused."""
    folder = cache / "gemma_mlx" / "models" / "tiny-b"
    files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    hub = FakeHub()
    hub.add("acme/gemma-tiny", files)
    hub.add("acme/gemma-other", files)
    fake = hub.serve()
    try:
        with running_server("--allow-pull", env=environment(tmp_path, hub.url)) as server:
            client = ollama.Client(host=server.url, timeout=300)
            progress = list(client.pull("acme/gemma-tiny", stream=True))
            assert progress[-1].status == "success"
            assert any(p.completed for p in progress)
            assert [m.model for m in client.list().models] == ["acme/gemma-tiny"]
            assert client.chat(model="acme/gemma-tiny", options={"num_predict": 3},
                               messages=[{"role": "user", "content": "Hi"}]).done
            openai_client = openai.OpenAI(base_url=server.v1, api_key="unused",
                                          max_retries=0, timeout=300)
            reply = openai_client.completions.create(model="acme/gemma-other", prompt="Hi",
                                                     max_tokens=3)
            assert reply.usage.completion_tokens == 3
            assert {m.model for m in client.list().models} == {"acme/gemma-tiny",
                                                                "acme/gemma-other"}
            client.delete("acme/gemma-tiny")
            assert [m.model for m in client.list().models] == ["acme/gemma-other"]
            with pytest.raises(openai.NotFoundError):
                openai_client.completions.create(model=str(folder), prompt="Hi", max_tokens=2)
    finally:
        fake.shutdown()
