"""The server as its users drive it: a real `python -m gemma_mlx serve` process on a free
127.0.0.1 port, the official `openai` and `ollama` clients, and raw HTTP.

Two models: a tiny random Gemma 3 with a vision tower and the official chat template (written to
disk by tests/checkpoints.py; its replies are gibberish, so only mechanics and equality with the
library are asserted), and the real 270M, a base model (raw completion). Nothing here talks to
anything but 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
from checkpoints import write_tiny_checkpoint
from PIL import Image
from servers import running_server

import gemma_mlx

GREEDY = {"temperature": 0, "max_tokens": 6}
SYSTEM = "Answer in one word."


def png(rgb, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, folder_270m):
    """A window of 128, as real windows (512, 1024) are longer than these conversations: a
    cache whose ring has wrapped cannot be trimmed back, so a reply that tokenizes otherwise
    when it is sent back would cost the whole prefix."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-vision", folder_270m,
                                 sliding_window=128)


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    return gemma_mlx.load(str(tiny_folder))


@pytest.fixture(scope="module")
def server(tiny_folder):
    with running_server("--model", str(tiny_folder)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(server):
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def name(tiny_folder):
    return str(tiny_folder)


def post(server, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120, **kwargs)


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    message = error["message"] if isinstance(error, dict) else error
    if isinstance(error, dict):  # OpenAI's shape
        assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return body


# ---- OpenAI -------------------------------------------------------------------------------------

def test_models_lists_the_served_model(client, name, tiny_folder):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == name and tiny_folder.name in ids


def test_chat_equals_the_library_with_an_image_and_streams_the_same(client, name, tiny_model):
    picture = png((200, 30, 30))
    chat = gemma_mlx.Chat(tiny_model, system=SYSTEM, temp=0, max_tokens=GREEDY["max_tokens"])
    expected = chat.send("What is this?", images=[picture])
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(picture)}},
                    {"type": "text", "text": "What is this?"}]}]
    reply = client.chat.completions.create(model=name, messages=messages, **GREEDY)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == len(chat.messages[-1].token_ids)
    streamed = client.chat.completions.create(model=name, messages=messages, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY)
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason


def test_a_follow_up_reuses_the_cached_prefix_and_its_images(client, server, name):
    picture = png((20, 200, 90))
    first = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(picture)}},
        {"type": "text", "text": "Describe the colour."}]}]
    one = client.chat.completions.create(model=name, messages=first, **GREEDY)
    encoded = server.metric("gemma_mlx_images_encoded")
    follow = [*first, {"role": "assistant", "content": one.choices[0].message.content},
              {"role": "user", "content": "And now?"}]
    two = client.chat.completions.create(model=name, messages=follow, **GREEDY)
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens
    assert two.usage.prompt_tokens > one.usage.prompt_tokens
    assert server.metric("gemma_mlx_images_encoded") == encoded  # not encoded again
    assert server.metric("gemma_mlx_prefix_cache_hits") >= 1


def test_a_conversation_sent_back_is_read_as_chat_reads_it(client, name, tiny_model):
    """A reply the server gave, sent back in the conversation, is read as the ids it generated
    (as Chat replays its own replies): the follow-up equals Chat's, and the server prefills
    only the new turn, however the reply's text would tokenize again."""
    chat = gemma_mlx.Chat(tiny_model, temp=0, max_tokens=GREEDY["max_tokens"])
    replies = [chat.send("Tell me a story."), chat.send("And then?")]
    messages = [{"role": "user", "content": "Tell me a story."}]
    one = client.chat.completions.create(model=name, messages=messages, **GREEDY)
    assert one.choices[0].message.content == replies[0]
    messages += [{"role": "assistant", "content": replies[0]},
                 {"role": "user", "content": "And then?"}]
    two = client.chat.completions.create(model=name, messages=messages, **GREEDY)
    assert two.choices[0].message.content == replies[1]
    # all but the reply's last token, which no step read, came from the cache
    reused = one.usage.prompt_tokens + one.usage.completion_tokens - 1
    assert two.usage.prompt_tokens_details.cached_tokens >= reused


def test_logprobs_are_the_models_own(client, name):
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hello"}], logprobs=True,
        top_logprobs=3, **GREEDY)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        top = [t.logprob for t in token.top_logprobs]
        assert top == sorted(top, reverse=True)
        assert token.top_logprobs[0].token == token.token  # greedy takes the likeliest


def test_stop_strings_end_the_reply_before_them(client, name):
    messages = [{"role": "user", "content": "Count."}]
    full = client.chat.completions.create(model=name, messages=messages, temperature=0,
                                          max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = client.chat.completions.create(model=name, messages=messages, temperature=0,
                                         max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_eight_concurrent_clients_get_their_solo_replies(client, name):
    prompts = [f"Tell me about the number {i}." for i in range(8)]

    def ask(prompt: str) -> str:
        return client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": prompt}],
            **GREEDY).choices[0].message.content

    solo = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == solo


def test_a_hang_up_mid_stream_frees_the_model_at_once(server, client, name):
    cancelled = server.metric('gemma_mlx_generations_total{finish_reason="cancelled"}')
    generated = server.metric("gemma_mlx_completion_tokens_total")
    body = {"model": name, "messages": [{"role": "user", "content": "Go on forever."}],
            "max_tokens": 400, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        frames = []
        for line in lines:
            if line.startswith("data:"):
                frames.append(line)
            if len(frames) == 4:
                break
    # The next request is answered, and the hung-up one ended long before its 400 tokens.
    reply = client.chat.completions.create(model=name, messages=[{"role": "user",
                                                                  "content": "Hi"}], **GREEDY)
    assert reply.choices[0].message.content is not None
    deadline = time.monotonic() + 30
    while (server.metric('gemma_mlx_generations_total{finish_reason="cancelled"}') == cancelled
           and time.monotonic() < deadline):
        time.sleep(0.2)
    assert server.metric('gemma_mlx_generations_total{finish_reason="cancelled"}') == cancelled + 1
    hung_up = server.metric("gemma_mlx_completion_tokens_total") - generated
    assert hung_up < 100 + reply.usage.completion_tokens


@pytest.mark.parametrize(("body", "status", "fragments"), [
    ({"n": 2}, 400, ["n"]),
    ({"frobnicate": True}, 400, ["frobnicate"]),
    ({"functions": [{"name": "f"}]}, 400, ["functions"]),
    ({"temperature": "hot"}, 400, ["temperature"]),
    ({"temperature": 5}, 400, ["temperature"]),
    ({"model": "gpt-4o"}, 404, ["gpt-4o", "not served"]),
    ({"messages": []}, 400, ["messages"]),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400,
     ["system message may only come first"]),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     ["alternate"]),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
     ["input_audio"]),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]},
     400, ["image"]),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, 400,
     ["local files are not read"]),
    ({"messages": [{"role": "user", "content": "x " * 600}]}, 400, ["context window"]),
])
def test_refusals_are_openai_error_objects_and_the_server_carries_on(server, name, body, status,
                                                                   fragments):
    request = {"model": name, "messages": [{"role": "user", "content": "Hi"}], **body}
    assert_error(post(server, "/v1/chat/completions", request), status, *fragments)
    ok = post(server, "/v1/chat/completions",
              {"model": name, "messages": [{"role": "user", "content": "Hi"}], **GREEDY})
    assert ok.status_code == 200


def test_bad_json_unknown_routes_and_the_openai_client_see_clean_errors(server, client, name):
    bad = httpx.post(server.v1 + "/chat/completions", content=b"{not json", timeout=30,
                     headers={"Content-Type": "application/json"})
    assert_error(bad, 400, "JSON")
    assert_error(httpx.get(server.url + "/v1/nowhere", timeout=30), 404, "/v1/nowhere")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError, match="unsupported"):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "a"}],
                                       presence_penalty=0.5)


def test_image_urls_to_private_addresses_are_refused_without_connecting(server, name):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    connections = []

    def watch():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                connections.append(listener.accept())
            except OSError:
                continue

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    urls = [f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/a.png",
            f"http://[::1]:{port}/a.png", "http://10.1.2.3/a.png",
            "http://169.254.169.254/latest/meta-data", f"http://2130706433:{port}/a.png",
            "http://0.0.0.0/a.png"]
    try:
        for url in urls:
            body = {"model": name, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}]}
            assert_error(post(server, "/v1/chat/completions", body), 400, "private or local",
                         "--allow-private-urls")
    finally:
        time.sleep(0.5)
        listener.close()
    assert connections == []


def test_metrics_and_health(server):
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok"
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for metric in ("gemma_mlx_requests_total", "gemma_mlx_prompt_tokens_total",
                   "gemma_mlx_completion_tokens_total", "gemma_mlx_queue_depth",
                   "gemma_mlx_prefix_cache_hits_total", "gemma_mlx_decode_tokens_per_second"):
        assert metric in text
    assert server.metric('gemma_mlx_requests_total{path="/v1/chat/completions",status="200"}') > 0


# ---- Ollama -------------------------------------------------------------------------------------

def test_ollama_chat_equals_the_library_and_streams_the_same(ollama_client, name, tiny_model):
    picture = png((10, 10, 220))
    chat = gemma_mlx.Chat(tiny_model, temp=0, max_tokens=5)
    expected = chat.send("What colour?", images=[picture])
    messages = [{"role": "user", "content": "What colour?", "images": [picture]}]
    options = {"temperature": 0, "num_predict": 5}
    reply = ollama_client.chat(model=name, messages=messages, options=options, stream=False)
    assert reply.message.content == expected and reply.done
    assert reply.eval_count == len(chat.messages[-1].token_ids) and reply.prompt_eval_count > 0
    parts = list(ollama_client.chat(model=name, messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    generated = ollama_client.generate(model=name, prompt="What colour?", images=[picture],
                                       options=options, stream=False)
    assert generated.response == expected


def test_ollama_listing_endpoints(ollama_client, name):
    assert [m.model for m in ollama_client.list().models] == [name]
    running = ollama_client.ps().models[0]
    assert running.model == name and running.context_length == 512
    shown = ollama_client.show(name)
    assert "vision" in shown.capabilities and shown.details.family == "gemma3"
    assert httpx.get(ollama_client._client.base_url.join("/api/version"),
                     timeout=30).json()["version"] == gemma_mlx.__version__


def test_ollama_refusals_in_ollamas_shape(server, ollama_client, name):
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="llama3", messages=[{"role": "user", "content": "a"}])
    assert e.value.status_code == 404
    body = assert_error(post(server, "/api/chat", {"model": name, "messages": [
        {"role": "user", "content": "a"}], "options": {"mirostat": 2}}), 400, "mirostat")
    assert set(body) == {"error"}
    assert_error(post(server, "/api/generate", {"model": name, "prompt": "a",
                                                 "template": "{{ .Prompt }}"}), 400, "template")
    assert_error(post(server, "/api/chat", {"model": name, "messages": [
        {"role": "user", "content": "a", "images": ["%%%"]}]}), 400, "base64")


# ---- the guarded server: API key, body bound, a queue of none -----------------------------------

@pytest.fixture(scope="module")
def guarded(tiny_folder):
    with running_server("--model", str(tiny_folder), "--api-key", "sesame", "--max-body-mb",
                        "1", "--max-batch", "1", "--max-queue", "0", "--allow-private-urls",
                        key="sesame") as running:
        yield running


def test_the_api_key_guards_every_endpoint_but_health(guarded, tiny_folder):
    assert httpx.get(guarded.url + "/health", timeout=30).status_code == 200
    assert_error(httpx.get(guarded.v1 + "/models", timeout=30), 401, "API key")
    assert set(assert_error(httpx.get(guarded.url + "/api/tags", timeout=30), 401)) == {"error"}
    wrong = httpx.get(guarded.v1 + "/models", headers={"Authorization": "Bearer nope"},
                      timeout=30)
    assert_error(wrong, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.v1, api_key="nope", max_retries=0).models.list()
    good = openai.OpenAI(base_url=guarded.v1, api_key="sesame", max_retries=0)
    assert good.models.list().data[0].id == str(tiny_folder)
    tags = ollama.Client(host=guarded.url, headers=guarded.headers).list()
    assert tags.models[0].model == str(tiny_folder)


def gemma_ps(server, *args: str):
    import subprocess
    import sys

    port = server.url.rsplit(":", 1)[1]
    return subprocess.run([sys.executable, "-m", "gemma_mlx", "ps", "--port", port, *args],
                          capture_output=True, text=True, timeout=60)


def test_ps_command_shows_what_the_server_has_loaded(server, tiny_folder, tiny_model):
    from gemma_mlx.loading import parameter_bytes
    from gemma_mlx.models import format_size

    result = gemma_ps(server)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "MEMORY", "CONTEXT", "UNTIL"]
    size = parameter_bytes(tiny_model.net)  # the weights in memory (quantized on load)
    assert row.split() == [str(tiny_folder), *format_size(size).split(),
                           str(tiny_model.context_limit), "forever"]


def test_ps_command_with_the_api_key(guarded, tiny_folder):
    refused = gemma_ps(guarded, "--api-key", "nope")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == (f"error: the server on {guarded.url} wants an API key: "
                                      "pass --api-key (or set GEMMA_MLX_API_KEY)")
    result = gemma_ps(guarded, "--api-key", "sesame", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["name"] == str(tiny_folder)


def test_image_urls_are_fetched_and_equal_the_same_image_sent_inline(guarded, tiny_folder):
    from test_server_parts import Site

    picture = png((120, 40, 200))
    site = Site("127.0.0.1", {"/p.png": (200, {"Content-Type": "image/png"}, picture)})
    client = openai.OpenAI(base_url=guarded.v1, api_key="sesame", max_retries=0, timeout=120)
    try:
        replies = [client.chat.completions.create(model=str(tiny_folder), messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What?"}]}],
            **GREEDY).choices[0].message.content
            for url in (site.url + "/p.png", data_url(picture))]
    finally:
        site.close()
    assert site.hits == ["/p.png"] and replies[0] == replies[1]


def test_bodies_over_the_bound_get_413_with_or_without_a_length(guarded, tiny_folder):
    big = {"model": str(tiny_folder), "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    assert_error(post(guarded, "/v1/chat/completions", big, headers=guarded.headers), 413,
                 "over 1 MB")

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    chunked = httpx.post(guarded.v1 + "/chat/completions", content=chunks(), timeout=60,
                         headers={**guarded.headers, "Content-Type": "application/json"})
    assert_error(chunked, 413)


def test_a_full_queue_answers_429_with_retry_after(guarded, tiny_folder):
    """--max-batch 1 --max-queue 0: a request while another runs is refused at once. (A
    starved client can find the first reply already over: then it is tried again.)"""
    body = {"model": str(tiny_folder), "messages": [{"role": "user", "content": "Go on."}],
            "max_tokens": 300, "temperature": 1.0, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", guarded.v1 + "/chat/completions", json=body, timeout=60,
                          headers=guarded.headers) as running:
            lines = running.iter_lines()  # kept: a discarded iterator closes the stream
            next(line for line in lines if line.startswith("data:"))
            second = post(guarded, "/v1/chat/completions", {**body, "max_tokens": 2,
                                                             "stream": False},
                          headers=guarded.headers)
        if second.status_code == 429:
            break
    assert second.status_code == 429, "".join(guarded.log[-12:])  # the server saw what?
    assert_error(second, 429, "busy")
    assert second.headers["Retry-After"] == "1"


# ---- the real 270M, a base model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server_270m(folder_270m):
    with running_server("--model", "270m") as running:
        yield running


def test_completions_equal_the_library_and_cli_raw(server_270m, model_270m):
    """What the library completes, as the one-shot CLI's --raw does (tests/test_cli.py)."""
    prompt = "The capital of France is"
    expected = gemma_mlx.generate(model_270m, prompt, raw=True, max_tokens=8, temp=0)
    client = openai.OpenAI(base_url=server_270m.v1, api_key="unused", max_retries=0,
                           timeout=300)
    reply = client.completions.create(model="270m", prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected
    streamed = client.completions.create(model="270m", prompt=prompt, max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    generated = ollama.Client(host=server_270m.url, timeout=300).generate(
        model="gemma3:270m", prompt=prompt, raw=True, stream=False,
        options={"temperature": 0, "num_predict": 8})
    assert generated.response == expected


def test_a_prompt_that_continues_a_completion_reuses_all_of_it(server_270m):
    """A raw prompt made of an earlier prompt, its completion and more text is read with the
    completion's own ids: only the new text is prefilled."""
    client = openai.OpenAI(base_url=server_270m.v1, api_key="unused", max_retries=0,
                           timeout=300)
    prompt = "A list of rivers: the Nile,"
    one = client.completions.create(model="270m", prompt=prompt, max_tokens=6, temperature=0)
    more = prompt + one.choices[0].text + " and"
    two = client.completions.create(model="270m", prompt=more, max_tokens=2, temperature=0)
    reused = one.usage.prompt_tokens + one.usage.completion_tokens - 1
    assert two.usage.prompt_tokens_details.cached_tokens >= reused
    assert two.usage.prompt_tokens == one.usage.prompt_tokens + one.usage.completion_tokens + 1


def test_a_base_model_refuses_chat_and_points_to_completions(server_270m):
    chat = {"model": "270m", "messages": [{"role": "user", "content": "Hi"}]}
    assert_error(post(server_270m, "/v1/chat/completions", chat), 400, "no chat template",
                 "/v1/completions")
    assert_error(post(server_270m, "/api/chat", chat), 400, "no chat template")


def test_ctrl_c_ends_open_streams_and_the_server(tiny_folder):
    with running_server("--model", str(tiny_folder)) as running:
        body = {"model": str(tiny_folder), "messages": [{"role": "user", "content": "Go on."}],
                "max_tokens": 450, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", running.v1 + "/chat/completions", json=body,
                          timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            stopped = time.monotonic()
            code = running.stop()
            rest = list(lines)
        assert code == 130 and time.monotonic() - stopped < 20  # as the CLI exits on Ctrl-C
        assert rest[-1] == "data: [DONE]" or rest[-2:] == ["data: [DONE]", ""]
        assert "Traceback" not in "".join(running.log)
