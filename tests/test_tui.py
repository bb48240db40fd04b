"""The terminal chat app, driven through Textual's Pilot: the real 270M for streaming and
stopping, a tiny random vision model (fast, deterministic) for images, commands and snapshots."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
from textual import events

import gemma_mlx
from tui.app import ChatApp, HelpScreen, SlashCommandProvider
from tui.commands import COMMANDS, complete, image_path_in, next_completion
from tui.widgets import (
    AttachmentBar,
    CompletionList,
    Composer,
    ImageThumbnail,
    LoadingPanel,
    MessageView,
    StatusBar,
)

# textual-image reads pixels with a Pillow call that Pillow 14 will remove; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
HOUSE = ASSETS / "house.jpg"
GREEDY = dict(temp=0.0, max_tokens=6)
SIZE = (100, 36)

TINY_VISION = {
    "model_type": "gemma3",
    "text_config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=128,
                        vocab_size=262208, sliding_window=16, max_position_embeddings=1024),
    "vision_config": dict(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=64),
    "mm_tokens_per_image": 4,
}


@pytest.fixture(scope="session")
def tiny_vision(folder_270m):
    """A random two-layer Gemma 3 with a vision tower and the real tokenizer."""
    from gemma_mlx.config import ModelConfig
    from gemma_mlx.loading import Model, load_tokenizer
    from gemma_mlx.model.gemma3 import Gemma3

    mx.random.seed(0)
    net = Gemma3(ModelConfig.from_dict(TINY_VISION))
    mx.eval(net.parameters())
    return Model(net, load_tokenizer(folder_270m), folder_270m, None, name="tiny-vision")


class RecordingApp(ChatApp):
    """Remembers every batch of streamed text and every notification."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("graphics", "halfcell")
        super().__init__(*args, **kwargs)
        self.streamed: list[str] = []
        self.notices: list[str] = []

    async def on_reply_text(self, message):
        self.streamed.append(message.text)
        await super().on_reply_text(message)

    def notify(self, message, *, title="", **kwargs):
        self.notices.append(f"{title}: {message}")
        super().notify(message, title=title, **kwargs)


def run(scenario):
    asyncio.run(scenario())


async def wait_until(pilot, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.02)
    await pilot.pause()


async def submit(pilot, text):
    pilot.app.query_one(Composer).set_text(text)
    await pilot.press("enter")
    await pilot.pause()


async def exchange(pilot, text):
    await submit(pilot, text)
    await wait_until(pilot, lambda: not pilot.app.busy)


def views(app):
    return [(v.role, v.text) for v in app.query(MessageView)]


def status(app):
    return str(app.query_one(StatusBar).render())


# ---- streaming, stopping, history on the real 270M ----------------------------------------

def test_a_reply_streams_and_finishes(model_270m):
    async def scenario():
        app = RecordingApp(model_270m, sampling=GREEDY)
        async with app.run_test(size=SIZE) as pilot:
            await submit(pilot, "The capital of France is")
            assert views(app)[0] == ("user", "The capital of France is")
            await wait_until(pilot, lambda: not app.busy)
            reply = app.chat.messages[-1]
            assert reply.role == "assistant" and len(reply.token_ids) == 6
            assert app.streamed and reply.text.startswith("".join(app.streamed))
            assert views(app)[-1] == ("assistant", reply.text)
            markdown = app.query(MessageView).last().query_one("Markdown")
            assert markdown.source == reply.text
            bar = status(app)
            assert model_270m.description in bar
            assert f"{app.chat.tokens_used:,}/32,768 tok" in bar
            assert "decode" in bar and "tok/s" in bar and "first token" in bar and "GB" in bar

    run(scenario)


def test_esc_stops_a_reply_and_the_next_turn_works(model_270m):
    async def scenario():
        app = RecordingApp(model_270m, sampling=dict(temp=0.0, max_tokens=200))
        async with app.run_test(size=SIZE) as pilot:
            await submit(pilot, "Once upon a time")
            await wait_until(pilot, lambda: app.streamed)
            await pilot.press("escape")
            await wait_until(pilot, lambda: not app.busy)
            stopped = app.chat.messages[-1]
            assert stopped.stopped and 0 < len(stopped.token_ids) < 200
            view = app.query(MessageView).last()
            assert view.has_class("-stopped") and view.text == stopped.text
            assert view.query_one(".stopped-mark").display

            await submit(pilot, "/set max_tokens 3")
            await exchange(pilot, "And then?")
            assert [m.role for m in app.chat.messages] == ["user", "assistant"] * 2
            assert not app.chat.messages[-1].stopped
            assert len(app.chat.messages[-1].token_ids) == 3
            assert not app.query(MessageView).last().has_class("-stopped")

    run(scenario)


def test_image_on_a_text_only_model_says_so(model_270m):
    async def scenario():
        app = RecordingApp(model_270m)
        async with app.run_test(size=SIZE) as pilot:
            await submit(pilot, f"/image {HOUSE}")
            assert app.pending == []
            assert any("takes text only" in n for n in app.notices)

    run(scenario)


# ---- the composer ---------------------------------------------------------------------

def test_history_and_new_lines(tiny_vision):
    async def scenario():
        app = RecordingApp(tiny_vision, sampling=GREEDY)
        async with app.run_test(size=SIZE) as pilot:
            composer = app.query_one(Composer)
            await pilot.press(*"hi")
            await pilot.press("shift+enter")
            await pilot.press(*"there")
            await pilot.press("ctrl+j", "x")
            assert composer.text == "hi\nthere\nx" and not app.chat.messages
            await pilot.press("enter")
            await wait_until(pilot, lambda: not app.busy)
            assert app.chat.messages[0].text == "hi\nthere\nx" and composer.text == ""
            await exchange(pilot, "second")

            await pilot.press(*"draft")
            await pilot.press("up")
            assert composer.text == "second"
            await pilot.press("up")
            assert composer.text == "hi\nthere\nx"
            assert composer.cursor_location == (2, 1)
            await pilot.press("up")  # not on the first line: the cursor moves
            assert composer.text == "hi\nthere\nx" and composer.cursor_location[0] == 1
            await pilot.press("up", "up")  # on the first line: nothing older to recall
            assert composer.text == "hi\nthere\nx"
            await pilot.press("down", "down", "down")
            assert composer.text == "second"
            await pilot.press("down")
            assert composer.text == "draft"

    run(scenario)


def test_completion_of_commands_settings_and_paths(tiny_vision, tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(HOUSE.read_bytes())
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "chat.json").write_text("{}")
    monkeypatch.chdir(tmp_path)

    assert [c.value for c in complete("/s")] == ["/system ", "/save ", "/set ", "/stats"]
    assert [c.value for c in complete("/image ph")] == ["/image photos/"]
    assert [c.value for c in complete("/image photos/")] == ["/image photos/cat.png"]
    assert [c.value for c in complete("/load ")] == ["/load chat.json", "/load photos/"]
    assert complete("hello") == [] and complete("/nope") == []
    settings = complete("/set t")
    assert next_completion("/set t", settings) == "/set temp "
    assert next_completion("/set temp ", settings) == "/set top_p "

    async def scenario():
        app = RecordingApp(tiny_vision)
        async with app.run_test(size=SIZE) as pilot:
            composer = app.query_one(Composer)
            await pilot.press(*"/he")
            assert app.query_one(CompletionList).display
            await pilot.press("tab")
            assert composer.text == "/help"
            composer.set_text("/ima")
            await pilot.press("tab")
            await pilot.pause()
            assert composer.text == "/image "
            await pilot.press(*"pho", "tab")
            await pilot.pause()
            await pilot.press("tab")
            await pilot.pause()
            assert composer.text == "/image photos/cat.png"
            await pilot.press("enter")
            assert [a.source for a in app.pending] == ["photos/cat.png"]
            assert not app.query_one(CompletionList).display

    run(scenario)


def test_pasting_an_image_path_attaches_it(tiny_vision):
    async def scenario():
        app = RecordingApp(tiny_vision)
        async with app.run_test(size=SIZE) as pilot:
            composer = app.query_one(Composer)
            app.post_message(events.Paste(f"'{HOUSE}'\n"))
            await pilot.pause()
            assert [a.source for a in app.pending] == [str(HOUSE)] and composer.text == ""
            assert app.query_one(AttachmentBar).display
            app.post_message(events.Paste("just text"))
            await pilot.pause()
            assert composer.text == "just text" and len(app.pending) == 1
            await submit(pilot, "/image -")
            assert app.pending == [] and not app.query_one(AttachmentBar).display

    assert image_path_in(f"file://{HOUSE}") == HOUSE
    assert image_path_in(str(HOUSE).replace(" ", "\\ ")) == HOUSE
    assert image_path_in("not/a/file.png") is None
    run(scenario)


# ---- images, errors, commands on the tiny vision model ------------------------------------

def test_an_attached_image_shows_as_a_thumbnail(tiny_vision):
    async def scenario():
        app = RecordingApp(tiny_vision, sampling=GREEDY)
        async with app.run_test(size=SIZE) as pilot:
            await submit(pilot, f"/image {HOUSE}")
            assert "house.jpg" in str(app.query_one(AttachmentBar).render())
            await exchange(pilot, "What is this?")
            user = app.query(MessageView).first()
            thumbnails = list(user.query(ImageThumbnail))
            assert len(thumbnails) == 1 and thumbnails[0].attachment.source == str(HOUSE)
            assert "house.jpg" in str(thumbnails[0].query_one(".caption").render())
            assert len(app.chat.messages[0].images) == 1 and app.pending == []
            assert not app.query_one(AttachmentBar).display

    run(scenario)


def test_bad_images_and_failed_turns_leave_the_conversation_as_it_was(tiny_vision, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")

    async def scenario():
        app = RecordingApp(tiny_vision, sampling=GREEDY, max_context=64)
        async with app.run_test(size=SIZE) as pilot:
            await exchange(pilot, "Hello")
            before = (views(app), list(app.chat.messages))
            await submit(pilot, "/image nope.png")
            assert "no such file" in app.notices[-1] and app.pending == []
            await submit(pilot, f"/image {fake}")
            assert "not an image" in app.notices[-1] and app.pending == []
            await submit(pilot, "word " * 80)  # more than the 64-token window
            await wait_until(pilot, lambda: not app.busy)
            assert app.notices[-1].startswith("ContextOverflow:")
            assert (views(app), app.chat.messages) == before

    run(scenario)


def test_dropped_turns_are_told_and_dimmed(tiny_vision):
    async def scenario():
        app = RecordingApp(tiny_vision, sampling=dict(temp=0.0, max_tokens=2), max_context=64)
        async with app.run_test(size=SIZE) as pilot:
            for i in range(4):
                await exchange(pilot, f"message number {i} with a few more words in it")
            assert any("dropped the oldest" in n for n in app.notices)
            assert app.chat.notices == []
            dimmed = [v.has_class("-dropped") for v in app.query(MessageView)]
            assert dimmed[:app.chat.first_turn] == [True] * app.chat.first_turn
            assert not any(dimmed[app.chat.first_turn:])
            # Older replies are drawn by one widget each, the newest keep Markdown widgets.
            flat = [v.flat for v in app.query(MessageView) if v.role == "assistant"]
            assert flat == [True, False, False, False]
            assert app.query(MessageView)[1].query_one(".body").render()  # still drawn

    run(scenario)


def test_retry_and_undo(tiny_vision):
    async def scenario():
        app = RecordingApp(tiny_vision, sampling=GREEDY)
        async with app.run_test(size=SIZE) as pilot:
            await submit(pilot, "/retry")
            assert "no reply to retry" in app.notices[-1]
            await submit(pilot, f"/image {HOUSE}")
            await exchange(pilot, "Describe it")
            first = app.chat.messages[-1].text
            await submit(pilot, "/retry")
            await wait_until(pilot, lambda: not app.busy)
            assert [m.role for m in app.chat.messages] == ["user", "assistant"]
            assert views(app) == [("user", "Describe it"), ("assistant", first)]  # greedy

            await submit(pilot, "/undo")
            assert app.chat.messages == [] and views(app) == []
            assert app.query_one(Composer).text == "Describe it"
            assert [a.source for a in app.pending] == [str(HOUSE)]
            await submit(pilot, "/undo")
            assert "nothing to undo" in app.notices[-1]

    run(scenario)


def test_every_slash_command(tiny_vision, tmp_path):
    saved = tmp_path / "chat.json"

    async def scenario():
        app = RecordingApp(tiny_vision, sampling=GREEDY)
        async with app.run_test(size=SIZE) as pilot:
            await submit(pilot, "/help")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)

            await submit(pilot, "/system")
            assert "no system prompt" in app.notices[-1]
            await submit(pilot, "/system Be brief.")
            assert app.chat.system == "Be brief."

            await submit(pilot, "/copy")
            assert "no reply to copy" in app.notices[-1]
            await submit(pilot, "/stats")
            assert "no reply yet" in app.notices[-1]
            await exchange(pilot, "Hi")
            await submit(pilot, "/copy")
            assert app.clipboard == app.chat.messages[-1].text
            await submit(pilot, "/stats")
            assert "decode 6 tok" in app.notices[-1] and "context" in app.notices[-1]

            await submit(pilot, "/set temp 0.5")
            await submit(pilot, "/set top_k 10")
            await submit(pilot, "/set top_p 0.5")
            await submit(pilot, "/set max_tokens 9")
            s = app.chat.settings
            assert (s.temp, s.top_k, s.top_p, s.max_tokens) == (0.5, 10, 0.5, 9)
            await submit(pilot, "/set top_p 2")
            assert "top-p must be between 0 and 1" in app.notices[-1] and s.top_p == 0.5
            await submit(pilot, "/set top_k many")
            assert "takes a whole number" in app.notices[-1] and s.top_k == 10
            await submit(pilot, "/set colour 1")
            assert "/set temp|top_p|top_k|max_tokens VALUE" in app.notices[-1]
            await submit(pilot, "/set")
            assert "temp 0.5" in app.notices[-1]

            await submit(pilot, f"/save {saved}")
            assert json.loads(saved.read_text())["system"] == "Be brief."
            await submit(pilot, "/system -")
            assert app.chat.system is None
            await submit(pilot, "/clear")
            assert app.chat.messages == [] and views(app) == []
            await submit(pilot, f"/load {saved}")
            assert [m.role for m in app.chat.messages] == ["user", "assistant"]
            assert app.chat.system == "Be brief." and len(views(app)) == 2
            await submit(pilot, f"/load {tmp_path / 'missing.json'}")
            assert "no saved chat" in app.notices[-1] and len(views(app)) == 2

            await submit(pilot, "/frobnicate")
            assert "/frobnicate is not a command" in app.notices[-1]
            await submit(pilot, "/image")
            assert "/image PATH" in app.notices[-1]
            await submit(pilot, "/quit")
        assert app.return_code == 0

    run(scenario)


def test_slash_commands_are_in_the_command_palette(tiny_vision):
    async def scenario():
        app = RecordingApp(tiny_vision)
        async with app.run_test(size=SIZE) as pilot:
            provider = SlashCommandProvider(app.screen)
            hits = [hit async for hit in provider.search("/ima")]
            assert hits and hits[0].text == "/image PATH"
            found = [hit.text async for hit in provider.discover()]
            assert found == [c.title for c in COMMANDS]

            await pilot.press("ctrl+p")
            await pilot.press(*"/image")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.query_one(Composer).text == "/image ")
            await pilot.press("ctrl+p")
            await pilot.press(*"/help")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))

    run(scenario)


def test_ctrl_c_twice_quits(tiny_vision):
    async def scenario():
        app = RecordingApp(tiny_vision)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+c")
            assert app.is_running and "Ctrl+C again" in app.notices[-1]
            await pilot.press("ctrl+c")
        assert app.return_code == 0

    run(scenario)


# ---- loading ----------------------------------------------------------------------------

def test_a_failed_load_shows_the_reason_not_a_traceback():
    async def scenario():
        app = RecordingApp("nope")
        async with app.run_test(size=SIZE) as pilot:
            panel = app.query_one(LoadingPanel)
            await wait_until(pilot, lambda: panel.has_class("-failed"))
            reason = str(panel.query_one(".reason").render())
            assert reason.startswith("unknown model 'nope': use one of 270m")
            assert "--model" in str(panel.query_one(".fix").render())
            await submit(pilot, "hello")
            assert "no model is loaded" in app.notices[-1]
            await submit(pilot, "/quit")
        assert app.return_code == 1

    run(scenario)


def test_loading_shows_download_progress_then_the_chat(tiny_vision):
    release = threading.Event()

    def loader(name, progress):
        assert name == "some/repo"
        with progress(total=2_000_000, unit="B", unit_scale=True, desc="Downloading bytes",
                      name="huggingface_hub.snapshot_download.transfer") as bar:
            bar.update(500_000)
            bar.refresh()
            release.wait(30)
        return tiny_vision

    async def scenario():
        app = RecordingApp("some/repo", loader=loader)
        async with app.run_test(size=SIZE) as pilot:
            panel = app.query_one(LoadingPanel)
            await wait_until(pilot, lambda: panel.bars)
            label, bar = next(iter(panel.bars.values()))
            assert "Downloading bytes: 500.0 KB / 2.0 MB" in str(label.render())
            assert bar.total == 2_000_000
            assert app.query_one(Composer).has_focus  # the screen stays responsive
            release.set()
            await wait_until(pilot, lambda: app.chat is not None)
            assert not app.query(LoadingPanel) and "tiny-vision" in status(app)

    run(scenario)


def test_messages_sent_while_loading_wait_and_then_go_out_in_order(tiny_vision):
    release = threading.Event()

    def loader(name, progress):
        release.wait(30)
        return tiny_vision

    async def scenario():
        app = RecordingApp("some/repo", loader=loader, sampling=GREEDY)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press(*"first", "enter")
            await submit(pilot, "second")
            waiting = list(app.query(MessageView))
            assert [(v.role, v.text) for v in waiting] == [("user", "first"), ("user", "second")]
            assert all(v.has_class("-waiting") and v.query_one(".waiting-mark").display
                       for v in waiting)
            assert app.chat is None and app.query_one(Composer).text == "" and not app.notices
            release.set()
            await wait_until(pilot, lambda: app.chat is not None and not app.busy
                             and len(app.chat.messages) == 4)
            assert [m.text for m in app.chat.messages[::2]] == ["first", "second"]
            assert views(app) == [(m.role, m.text) for m in app.chat.messages]
            assert not app.query(".-waiting")

    run(scenario)


def test_messages_waiting_for_a_model_that_fails_to_load_say_so():
    def loader(name, progress):
        time.sleep(0.5)
        raise gemma_mlx.ModelNotFound("no such model")

    async def scenario():
        app = RecordingApp("some/repo", loader=loader)
        async with app.run_test(size=SIZE) as pilot:
            await submit(pilot, "hello")
            await wait_until(pilot, lambda: app.query_one(LoadingPanel).has_class("-failed"))
            view = app.query_one(MessageView)
            assert view.has_class("-unsent") and view.text == "hello"
            assert "not sent: the model did not load" in str(
                view.query_one(".waiting-mark").render())

    run(scenario)


# ---- the command line ---------------------------------------------------------------------

def test_chat_command_builds_the_app(monkeypatch, capsys):
    from gemma_mlx.cli import main

    made = {}

    def fake_run(self):
        made.update(model=self.model_name, system=self.system, sampling=self.sampling,
                    max_context=self.max_context, kv_bits=self.kv_bits)

    monkeypatch.setattr(ChatApp, "run", fake_run)
    assert main(["chat", "-m", "270m", "--system", "Be brief.", "--temp", "0", "--top-k", "5",
                 "--max-context", "256", "--kv-bits", "8"]) == 0
    assert made == dict(model="270m", system="Be brief.", sampling={"temp": 0.0, "top_k": 5},
                        max_context=256, kv_bits=8)
    assert main(["chat", "--top-p", "3"]) == 1
    assert main(["chat", "--load", "missing.json"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: top-p must be between 0 and 1 (got 3.0)",
                   "error: no saved chat at missing.json: check the path"]


# ---- snapshots ------------------------------------------------------------------------------

def snapshot_app(model):
    """Greedy, cells for pictures, no timings: the same screen on every run and machine."""
    sampling = dict(temp=0.0, max_tokens=12)  # the tiny model's first words come at 11 and 12
    return ChatApp(model, sampling=sampling, graphics="halfcell", show_timings=False)


def test_snapshot_empty_screen(snap_compare, tiny_vision):
    assert snap_compare(snapshot_app(tiny_vision), terminal_size=SIZE)


def test_snapshot_exchange_with_an_image(snap_compare, tiny_vision):
    async def run_before(pilot):
        await submit(pilot, f"/image {HOUSE}")
        await exchange(pilot, "What is in this picture?")

    assert snap_compare(snapshot_app(tiny_vision), terminal_size=SIZE, run_before=run_before)


def test_snapshot_help(snap_compare, tiny_vision):
    assert snap_compare(snapshot_app(tiny_vision), terminal_size=SIZE, press=["f1"])


def test_gemma_mlx_public_names_only():
    """The app stays on the public API (DESIGN.md): no gemma_mlx submodule imports."""
    source = "".join(p.read_text() for p in (Path(__file__).parent.parent / "tui").glob("*.py"))
    assert "from gemma_mlx." not in source and "import gemma_mlx." not in source
    assert set(gemma_mlx.__all__) >= {"Chat", "load", "GemmaError", "Attachment", "Stats"}


def test_a_quantized_kv_cache_is_used_and_shown(tiny_vision):
    async def scenario():
        app = RecordingApp(tiny_vision, sampling=GREEDY, max_context=128, kv_bits=8)
        async with app.run_test(size=SIZE) as pilot:
            await exchange(pilot, "Hello")
            assert app.chat.kv_bits == 8 and app.chat.context_limit == 128
            assert "KV 8-bit" in status(app) and "/128 tok" in status(app)

    run(scenario)


# ---- tools ------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}}}


def test_a_reply_that_calls_shows_a_call_block_and_the_next_message_answers_it(tiny_vision):
    from tui.widgets import CallBlock

    async def scenario():
        app = RecordingApp(tiny_vision, sampling=dict(temp=0, max_tokens=60), tools=[WEATHER],
                           tool_choice="required")
        async with app.run_test(size=(100, 40)) as pilot:
            await wait_until(pilot, lambda: app.chat is not None)
            await exchange(pilot, "Weather in Oslo?")
            call = app.chat.messages[-1].tool_calls[0]
            blocks = app.query(CallBlock)
            assert [b.call for b in blocks] == [call] and call.name == "get_weather"
            assert str(blocks[0].render()).startswith("⚙ get_weather(city=")
            reply_view = app.query(MessageView)[-1]
            assert '{"name"' not in reply_view.text and not reply_view.query(".body")
            await exchange(pilot, "-3 degrees")
            roles = [m.role for m in app.chat.messages]
            assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant"
            assert app.chat.messages[2].text == "-3 degrees"
            assert [v.role for v in app.query(MessageView)][:3] == ["user", "assistant", "tool"]
            await app.show_conversation()  # drawn afresh from the Chat: the same blocks
            assert [b.call for b in app.query(CallBlock)][0] == call

    run(scenario)


def test_bad_tools_options_are_one_line_errors(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "tools.json"
    bad.write_text('[{"type": "function", "function": {"name": "no spaces allowed"}}]')
    for args, fragment in ((["--tools", str(bad)], "name"),
                           (["--tools", str(tmp_path / "none.json")], "cannot read"),
                           (["--tool-choice", "required"], "needs --tools")):
        result = subprocess.run([sys.executable, "-m", "gemma_mlx", "chat", "-m", "270m", *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and fragment in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
