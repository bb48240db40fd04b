"""The server's parts on their own: image URL rules (redirects included), stop strings, the
session pool's choice. Local listeners on 127.0.0.x only; nothing reaches any other address."""

from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import pytest
from PIL import Image

from gemma_mlx.errors import BadImage, BadRequest
from gemma_mlx.prompt import Prompt
from gemma_mlx.server import remote_images
from gemma_mlx.server.errors import APIError
from gemma_mlx.server.pool import SessionPool
from gemma_mlx.server.remote_images import ImageFetcher, decode_data_url, is_public
from gemma_mlx.stopping import StopStrings


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


class Site:
    """A tiny HTTP server on a loopback address, counting the requests it gets."""

    def __init__(self, host: str, routes: dict[str, tuple[int, dict, bytes]]):
        site = self
        self.hits: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                site.hits.append(self.path)
                status, headers, body = routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def only_127_0_0_1_is_public(monkeypatch):
    """Treat 127.0.0.1 as a public address and 127.0.0.2 as the private network behind it."""
    monkeypatch.setattr(remote_images, "is_public", lambda a: a == "127.0.0.1")


def test_a_redirect_into_a_private_address_is_refused_before_connecting(only_127_0_0_1_is_public):
    inner = Site("127.0.0.2", {"/secret.png": (200, {}, png())})
    outer = Site("127.0.0.1", {"/a.png": (302, {"Location": f"{inner.url}/secret.png"}, b""),
                               "/ok.png": (200, {}, png())})
    try:
        fetcher = ImageFetcher()
        assert fetcher.fetch(outer.url + "/ok.png") == png()
        with pytest.raises(BadImage, match="private or local"):
            fetcher.fetch(outer.url + "/a.png")
        assert outer.hits == ["/ok.png", "/a.png"] and inner.hits == []
        assert ImageFetcher(allow_private=True).fetch(outer.url + "/a.png") == png()
        assert inner.hits == ["/secret.png"]
    finally:
        inner.close()
        outer.close()


def test_fetch_failures_are_one_line_bad_images(only_127_0_0_1_is_public):
    site = Site("127.0.0.1", {"/big.png": (200, {}, b"x" * 5000),
                              "/loop": (302, {"Location": "/loop"}, b"")})
    try:
        with pytest.raises(BadImage, match="HTTP 404"):
            ImageFetcher().fetch(site.url + "/missing.png")
        with pytest.raises(BadImage, match="over"):
            ImageFetcher(max_bytes=1000).fetch(site.url + "/big.png")
        with pytest.raises(BadImage, match="redirects more than"):
            ImageFetcher().fetch(site.url + "/loop")
        with pytest.raises(BadImage, match="local files are not read"):
            ImageFetcher().fetch("file:///etc/passwd")
    finally:
        site.close()


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("127.0.0.1", False), ("10.0.0.1", False), ("192.168.1.1", False),
    ("172.16.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
    ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("2001:4860:4860::8888", True), ("224.0.0.1", False),
])
def test_which_addresses_are_public(address, public):
    assert is_public(address) is public


def test_data_urls():
    import base64

    data = png()
    assert decode_data_url("data:image/png;base64," + base64.b64encode(data).decode(),
                           1 << 20) == data
    with pytest.raises(BadImage, match="base64"):
        decode_data_url("data:image/png,rawdata", 1 << 20)
    with pytest.raises(BadImage, match="not valid base64"):
        decode_data_url("data:image/png;base64,%%%", 1 << 20)


@pytest.mark.parametrize(("pieces", "stops", "shown", "hit"), [
    (["Hello wor", "ld. Bye"], ["world"], "Hello ", True),
    (["a", "b", "c"], ["bc"], "a", True),
    (["ab", "cd"], ["xyz"], "abcd", False),
    (["END", "more"], ["END"], "", True),
    (["almost E", "N"], ["END"], "almost EN", False),
    (["one", " two"], [], "one two", False),
])
def test_stop_strings(pieces, stops, shown, hit):
    stopper = StopStrings(stops)
    out = "".join(stopper.feed(p) for p in pieces) + stopper.flush()
    assert out == shown and stopper.hit is hit


def test_too_many_stop_strings():
    with pytest.raises(BadRequest, match="at most"):
        StopStrings([str(i) for i in range(20)])


class FakeSession:
    def __init__(self, model, features=None, **options):
        self.ids: list[int] = []
        self.reset_count = 0

    def common_prefix(self, prompt: Prompt) -> int:
        n = 0
        for a, b in zip(self.ids, prompt.ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    def reset(self):
        self.ids = []
        self.reset_count += 1

    nbytes = 100


def test_the_pool_keeps_conversations_apart_and_within_bounds(monkeypatch):
    from gemma_mlx.server import pool as pool_module

    monkeypatch.setattr(pool_module, "Session", FakeSession)
    monkeypatch.setattr(pool_module, "FeatureCache", lambda model: None)
    pool = SessionPool(model=None, max_sessions=2, max_bytes=10_000)

    a, _ = pool.checkout(Prompt([2, 10, 11, 12]))
    a.ids = [2, 10, 11, 12, 13]
    pool.checkin(a)
    b, _ = pool.checkout(Prompt([2, 20, 21]))  # another conversation: a session of its own
    assert b is not a
    b.ids = [2, 20, 21, 22]
    pool.checkin(b)
    again, common = pool.checkout(Prompt([2, 10, 11, 12, 13, 14, 15]))  # a's follow-up
    assert again is a and common == 5
    pool.checkin(again)
    retry, common = pool.checkout(Prompt([2, 20, 21, 99]))  # b edited: most of it is there
    assert retry is b and common == 3
    pool.checkin(retry)
    third, _ = pool.checkout(Prompt([2, 30]))  # no room: the least recently used is reused
    assert third is a
    pool.checkin(third)
    assert pool.sessions == 2

    small = SessionPool(model=None, max_sessions=4, max_bytes=150)
    sessions = [small.checkout(Prompt([2, i]))[0] for i in range(3)]
    for session in sessions:
        session.ids = [2, 1]
        small.checkin(session)
    assert small.sessions == 1 and sessions[0].reset_count == 1  # bounded by bytes


def test_the_server_package_does_not_need_mlx_in_its_handlers():
    """HTTP handlers never touch MLX: only the worker (and its pool) import it."""
    root = Path(__file__).parent.parent / "gemma_mlx" / "server"
    for name in ("openai_api.py", "ollama_api.py", "app.py", "render.py", "responses.py",
                 "jobs.py", "remote_images.py", "errors.py"):
        assert "mlx.core" not in (root / name).read_text(), name


# ---- which models stay loaded (registry.py) ----------------------------------------------------

def test_keep_alive_durations_read_as_ollama_writes_them():
    from gemma_mlx.server.registry import FOREVER, parse_keep_alive

    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("300ms") == pytest.approx(0.3) and parse_keep_alive(45) == 45
    assert parse_keep_alive("0") == 0 and parse_keep_alive(None) is None
    assert parse_keep_alive(-1) == FOREVER and parse_keep_alive("-5m") == FOREVER
    for bad in ("soon", "5 m", "m", ""):
        with pytest.raises(BadRequest, match="is not a duration"):
            parse_keep_alive(bad)


def _registry(max_loaded: int, max_memory: int):
    from gemma_mlx.server.registry import Catalog, ModelRegistry, Servable, ServedModel

    registry = ModelRegistry(Catalog([]), None, keep_alive=60, max_loaded=max_loaded,
                             max_memory=max_memory)
    unloaded = []
    registry.unloader = unloaded.append

    def loaded(name: str, size: int, claims: int = 0, used: float = 0.0) -> ServedModel:
        served = ServedModel(Servable(name, [name], Path(name), size), None, 512, 0, size,
                             claims=claims, last_used=used)
        registry.add(served)
        return served

    return registry, loaded, unloaded, lambda name, size: Servable(name, [name], Path(name),
                                                                    size)


def test_room_is_made_by_unloading_the_least_recently_used_idle_model():
    from gemma_mlx.server.registry import NotYet

    registry, loaded, unloaded, entry = _registry(max_loaded=3, max_memory=100)
    old, recent, busy = loaded("old", 40, used=1), loaded("recent", 30, used=2), \
        loaded("busy", 20, claims=1, used=0)
    registry.make_room(entry("small", 10))  # fits: 90 + 10, but 4 models > 3
    assert unloaded == [old]
    registry.make_room(entry("big", 70))  # 50 + 70 > 100: the idle one goes, then fits
    assert unloaded == [old, recent]
    registry.release(busy)
    assert busy.claims == 0 and busy.expires_at > 0
    with pytest.raises(APIError) as error:
        registry.make_room(entry("huge", 101))
    assert error.value.status == 503 and "--max-memory" in error.value.message
    registry, loaded, unloaded, entry = _registry(max_loaded=1, max_memory=100)
    loaded("in-use", 10, claims=1)
    with pytest.raises(NotYet):  # the load waits for the model in use
        registry.make_room(entry("next", 10))
    assert unloaded == []


def test_expired_models_are_only_idle_ones_past_their_time():
    registry, loaded, _, _ = _registry(max_loaded=3, max_memory=100)
    idle, busy = loaded("idle", 1), loaded("busy", 1, claims=1)
    idle.expires_at = busy.expires_at = 0.0
    assert registry.expired() == [idle]
    assert registry.loaded() == [busy]


def test_a_job_the_worker_holds_between_its_queues_still_counts_against_max_queue():
    """--max-batch 1 --max-queue 0: while the first job is anywhere between submission and
    its end, including in the worker's hands before it is started, a second one gets 429."""
    import asyncio

    from gemma_mlx.server.jobs import Claim, Failed, Job
    from gemma_mlx.server.metrics import Metrics
    from gemma_mlx.server.worker import HostOptions, Worker

    async def scenario():
        loop = asyncio.get_running_loop()
        worker = Worker(HostOptions(max_batch=1), max_queue=0, metrics=Metrics())
        worker._thread = threading.current_thread()  # open for submissions; no loop runs
        served = object()

        def job() -> Job:
            return Job(request=None, loop=loop, claim=Claim(served, lambda: None))

        first = job()
        worker.submit(first)
        worker._queue.get_nowait()  # the worker took it and has not started it yet
        with pytest.raises(APIError) as refused:
            worker.submit(job())
        assert refused.value.status == 429
        first.emit(Failed(APIError(503, "done")))  # it ends: its place is free again
        worker.submit(job())

    asyncio.run(scenario())
