"""The terminal chat app: a Textual App over `gemma_mlx.Chat`.

Loading and generation run in worker threads; what they produce comes back as messages. A reply's
text is batched so that drawing never holds up decoding: at most one message every
FLUSH_SECONDS, and less often when drawing takes more than UI_SHARE of the main thread (a slow
machine, a long conversation: every frame lays out the whole conversation). Only `gemma_mlx`'s
public names are used.
"""

from __future__ import annotations

import asyncio
import gc
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Markdown

import gemma_mlx
from gemma_mlx import Attachment, Chat, GemmaError, Model, Stats

from .commands import BY_NAME, COMMANDS, SETTINGS, complete, image_path_in, next_completion, parse
from .terminal import Terminal, take_over
from .widgets import (
    AttachmentBar,
    CompletionList,
    Composer,
    Conversation,
    LoadingPanel,
    MessageView,
    StatusBar,
    StatusInfo,
    Welcome,
    welcome_text,
)

FLUSH_SECONDS = 0.05  # how often streamed text reaches the screen, at most
MAX_FLUSH_SECONDS = 0.5  # and at least
UI_SHARE = 0.05  # of the main thread's time that drawing a streaming reply may take
LIVE_MESSAGES = 6  # the newest messages keep their Markdown widgets; older ones are flat
QUIT_WINDOW_SECONDS = 2.0  # the second Ctrl+C must come within this
ERROR_SECONDS = 8.0

TurnStarter = Callable[[Callable[[], bool]], Iterator[gemma_mlx.Chunk]]


# ---- messages from the worker threads ----------------------------------------------------

@dataclass
class LoadProgress(Message):
    bar_id: int
    description: str
    done: float
    total: float | None
    unit: str


@dataclass
class ModelLoaded(Message):
    model: Model


@dataclass
class LoadFailed(Message):
    reason: str


@dataclass
class ReplyText(Message):
    text: str
    stats: Stats


@dataclass
class ReplyFinished(Message):
    text: str  # the rest of the text, not yet sent
    stats: Stats | None


@dataclass
class ReplyFailed(Message):
    error: GemmaError


def progress_class(post: Callable[[Message], Any]) -> type:
    """A tqdm class for `gemma_mlx.load(progress=...)` (huggingface_hub's downloads) that
    draws nothing itself and posts its figures to the app instead."""
    from tqdm.auto import tqdm

    class AppProgress(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub's own tqdm takes a name; tqdm does not
            kwargs.update(file=io.StringIO(), disable=False, mininterval=0.2)
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> None:
            post(LoadProgress(id(self), self.desc.rstrip(": "), self.n, self.total,
                              self.unit))

    return AppProgress


# ---- screens and the palette ------------------------------------------------------------

KEYS = (
    ("Enter", "send"),
    ("Shift+Enter, Ctrl+J", "new line"),
    ("Up / Down", "earlier messages (cursor on the first / last line)"),
    ("Tab", "complete a command, setting or path"),
    ("Esc", "stop the reply (the part so far stays, marked stopped)"),
    ("Ctrl+P", "command palette"),
    ("F1", "this help"),
    ("Ctrl+C twice", "quit"),
)


def help_text() -> str:
    commands = [f"- `{c.title}`: {c.summary}" for c in COMMANDS]
    keys = [f"- **{key}**: {what}" for key, what in KEYS]
    return "\n".join([
        "# Commands", "", *commands, "", "# Keys", "", *keys, "",
        "Paste or drop an image file to attach it. Esc closes this help.",
    ])


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Markdown(help_text())

    def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)


class SlashCommandProvider(Provider):
    """The slash commands in the command palette (Ctrl+P)."""

    async def discover(self) -> Hits:
        app = self.app
        assert isinstance(app, ChatApp)
        for command in COMMANDS:
            yield DiscoveryHit(command.title, partial(app.palette_command, command.name),
                               help=command.summary)

    async def search(self, query: str) -> Hits:
        app = self.app
        assert isinstance(app, ChatApp)
        matcher = self.matcher(query)
        for command in COMMANDS:
            score = matcher.match(command.title)
            if score > 0:
                yield Hit(score, matcher.highlight(command.title),
                          partial(app.palette_command, command.name), help=command.summary)


# ---- the app ----------------------------------------------------------------------------

class ChatApp(App[int]):
    """Chat with a Gemma 3 model. `model` is a name to load (in a worker) or a loaded Model.
    Messages sent while it loads wait, shown as such, and go out once it is ready.

    `graphics` picks how thumbnails are drawn ("auto", or "halfcell" / "unicode" for the same
    cells everywhere); `show_timings=False` leaves speeds and memory out of the status bar, so
    screenshots of the same session are identical. `terminal` is the real terminal as
    `terminal.take_over` found it (run() passes it): its input then reaches the app through
    a filter that keeps the terminal's replies out, and its graphics decide "auto"."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses live elsewhere
    TITLE = "gemma-mlx"
    COMMANDS = App.COMMANDS | {SlashCommandProvider}
    BINDINGS = [
        Binding("escape", "stop_reply", "Stop reply"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+c", "quit_twice", "Quit", show=False, priority=True),
    ]

    def __init__(self, model: str | Model = "4b", *, system: str | None = None,
                 load_path: str | None = None, max_context: int | None = None,
                 kv_bits: int | None = None, sampling: dict[str, Any] | None = None,
                 draft_model: str | Model | None = None, num_draft_tokens: int | None = None,
                 graphics: str = "auto", show_timings: bool = True,
                 loader: Callable[..., Model] = gemma_mlx.load, terminal: Terminal | None = None,
                 tools: list[dict] | None = None, tool_choice: str | None = None):
        """`tools` (OpenAI-style definitions): replies may call them, shown as call blocks;
        the next message answers the calls (its text is each call's result)."""
        super().__init__(driver_class=terminal.driver_class if terminal else None)
        self.terminal = terminal
        self.model_name = model if isinstance(model, str) else model.name
        self.model: Model | None = None if isinstance(model, str) else model
        self.system = system
        self.load_path = load_path
        self.max_context = max_context
        self.kv_bits = kv_bits
        self.draft_model = draft_model  # a name is loaded after the model, in the same worker
        self.num_draft_tokens = num_draft_tokens
        self.sampling = dict(sampling or {})
        self.tools = tools
        self.tool_choice = tool_choice
        self.graphics = terminal.graphics if terminal and graphics == "auto" else graphics
        self.show_timings = show_timings
        self.loader = loader
        self.chat: Chat | None = None
        self.pending: list[Attachment] = []  # images for the next message
        self.loading = False  # the model (or the draft) is loading
        self.waiting: list[str] = []  # messages sent while it loads, oldest first
        self.busy = False  # a reply is streaming
        self.last_stats: Stats | None = None
        self._stop = threading.Event()
        self._generating = threading.Event()  # set while the reply thread runs
        self.flush_seconds = FLUSH_SECONDS  # read by the reply thread; adapted as it streams
        self._ui_clock = (0.0, 0.0)  # (wall, main-thread CPU) at the last batch of text
        self._reply: MessageView | None = None
        self._stream = None  # the MarkdownStream of the streaming reply
        self._cycling = False  # Tab is cycling through the completion list
        self._quit_armed_at = 0.0
        self.tokens_used = 0  # the conversation's tokens, as of the last finished turn
        self.return_code_on_quit = 0  # 1 once the model failed to load

    # ---- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Conversation(id="conversation")
        yield CompletionList(id="completions")
        yield AttachmentBar(id="attachments")
        yield Composer(id="composer")
        yield StatusBar(self.show_timings, id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one(CompletionList).display = False
        self.query_one(AttachmentBar).display = False
        composer = self.query_one(Composer)
        composer.cursor_blink = self.show_timings  # no blinking in screenshots
        composer.focus()
        if self.terminal is not None:  # keys from now on reach the composer (after its focus)
            self.call_later(self.terminal.ready.set)
        if self.model is None or isinstance(self.draft_model, str):
            self.loading = True
            await self.query_one(Conversation).mount(LoadingPanel(self.model_name, id="loading"))
            self.update_status()
            self.load_model()
        else:
            await self.start_chat(self.model)

    # ---- loading ------------------------------------------------------------------------

    @work(thread=True, group="load")
    def load_model(self) -> None:
        try:
            model = self.model or self.loader(self.model_name,
                                              progress=progress_class(self.post_message))
            if isinstance(self.draft_model, str):  # checked against the model as it loads
                self.draft_model = gemma_mlx.load_draft(
                    self.draft_model, model, progress=progress_class(self.post_message))
        except GemmaError as e:
            self.post_message(LoadFailed(str(e)))
        except (OSError, MemoryError) as e:
            self.post_message(LoadFailed(f"{type(e).__name__}: {e}".splitlines()[0]))
        else:
            self.post_message(ModelLoaded(model))

    def on_load_progress(self, message: LoadProgress) -> None:
        for panel in self.query(LoadingPanel):
            panel.progress(message.bar_id, message.description, message.done, message.total,
                           message.unit)

    async def on_model_loaded(self, message: ModelLoaded) -> None:
        self.loading = False
        await self.query(LoadingPanel).remove()
        await self.start_chat(message.model)

    def on_load_failed(self, message: LoadFailed) -> None:
        self.loading = False
        fix = ("Start again with another --model (270m, 1b, 4b, 12b, 27b, a Hub repo id, "
               "a folder or a .gguf file). Ctrl+C twice or /quit leaves.")
        self.query_one(LoadingPanel).failed(message.reason, fix)
        for view in self.waiting_views():
            view.unsent("the model did not load")
        self.return_code_on_quit = 1

    async def start_chat(self, model: Model) -> None:
        self.model = model
        try:
            if self.load_path:
                self.chat = Chat.load(self.load_path, model, **self._chat_options())
                if self.system is not None:
                    self.chat.system = self.system
            else:
                self.chat = Chat(model, system=self.system, **self._chat_options())
        except GemmaError as e:
            self.report(e)
            self.draft_model = None  # if it was the draft that did not fit: go on without it
            self.chat = Chat(model, system=self.system, **self._chat_options())
        await self.show_conversation()
        await self.send_waiting()

    def _chat_options(self) -> dict[str, Any]:
        options = dict(self.sampling)
        if self.max_context is not None:
            options["max_context"] = self.max_context
        if self.kv_bits is not None:
            options["kv_bits"] = self.kv_bits
        if isinstance(self.draft_model, Model):
            options["draft_model"] = self.draft_model
            if self.num_draft_tokens is not None:
                options["num_draft_tokens"] = self.num_draft_tokens
        return options

    # ---- the conversation view -----------------------------------------------------------

    async def show_conversation(self) -> None:
        """Draw the whole conversation afresh from the Chat (after undo, load, a failure...)."""
        conversation = self.query_one(Conversation)
        await conversation.remove_children()
        chat = self.chat
        assert chat is not None and self.model is not None
        old = len(chat.messages) - LIVE_MESSAGES
        views = [MessageView(m.role, m.text, m.images, m.stopped, self.graphics, flat=i < old,
                             tool_calls=m.tool_calls) for i, m in enumerate(chat.messages)]
        for view in views[:chat.first_turn]:
            view.add_class("-dropped")
        waiting = [MessageView("user", text, graphics=self.graphics).wait()
                   for text in self.waiting]
        await conversation.mount(Welcome(welcome_text(self.model), id="welcome"))
        await conversation.mount_all(views + waiting)
        conversation.restart()
        self.update_status()

    def message_views(self) -> list[MessageView]:
        return [v for v in self.query_one(Conversation).query_children(MessageView)
                if not v.has_class("-waiting")]

    def waiting_views(self) -> list[MessageView]:
        return list(self.query_one(Conversation).query_children(".-waiting"))

    async def mount_message(self, view: MessageView) -> None:
        """At the end of the conversation, before the messages still waiting."""
        waiting = self.waiting_views()
        await self.query_one(Conversation).mount(view, before=waiting[0] if waiting else None)

    def update_status(self, streaming: Stats | None = None) -> None:
        """The status bar; while a reply streams, its running figures (and the context as
        it was, plus the tokens generated so far)."""
        info = StatusInfo(model=self.model.description if self.model else self.model_name)
        if self.chat is not None:
            if streaming is None:
                self.tokens_used = self.chat.tokens_used
            info.context_limit = self.chat.context_limit
            if self.chat.kv_bits:
                info.model += f", KV {self.chat.kv_bits}-bit"
            if self.chat.draft_model is not None:
                info.model += f", draft {self.chat.draft_model.name}"
            info.tokens_used = self.tokens_used + (streaming.generated_tokens if streaming else 0)
        info.stats = streaming or self.last_stats
        info.streaming = streaming is not None
        self.query_one(StatusBar).show(info)

    def report(self, error: GemmaError | str, title: str | None = None) -> None:
        text = str(error)
        if title is None and isinstance(error, GemmaError):
            title = type(error).__name__
        self.notify(text, title=title or "", severity="error", timeout=ERROR_SECONDS,
                    markup=False)

    def tell(self, text: str, title: str = "") -> None:
        self.notify(text, title=title, markup=False)

    # ---- the composer -------------------------------------------------------------------

    async def on_composer_submitted(self, message: Composer.Submitted) -> None:
        text = message.text.strip()
        if image_path_in(text) is not None:
            self.attach(text)
        elif text.startswith("/"):
            await self.run_command(text)
        else:
            await self.send(message.text)

    def on_composer_image_pasted(self, message: Composer.ImagePasted) -> None:
        self.attach(message.path)

    @on(Composer.Changed)
    def show_completions(self) -> None:
        completions = self.query_one(CompletionList)
        text = self.query_one(Composer).text
        if self._cycling and text in [c.value for c in completions.candidates]:
            return
        self._cycling = False
        completions.show(complete(text))

    def on_composer_completion_requested(self) -> None:
        composer = self.query_one(Composer)
        completions = self.query_one(CompletionList)
        text = composer.text
        new = next_completion(text, completions.candidates)
        if new is None or new == text:
            return
        values = [c.value for c in completions.candidates]
        self._cycling = new in values and len(values) > 1
        composer.set_text(new)
        completions.point_at(new)

    # ---- turns --------------------------------------------------------------------------

    async def send(self, text: str) -> None:
        if self.loading and self.chat is None:
            await self.wait_for_model(text)
            return
        if not self.ready_for("send a message"):
            return
        assert self.chat is not None
        attachments, self.pending = self.pending, []
        self.query_one(AttachmentBar).show(self.pending)
        sources = [a.source or a.image for a in attachments]
        chat = self.chat
        calls = self.unanswered_calls()
        role = "tool" if calls and not attachments else "user"
        await self.mount_message(MessageView(role, text, attachments, graphics=self.graphics))
        conversation = self.query_one(Conversation)
        conversation.scroll_end(animate=False, immediate=True)  # back to the end, to follow
        conversation.follow()
        options: dict[str, Any] = {}
        if self.tools:
            options = {"tools": self.tools, "tool_choice": self.tool_choice}
        if role == "tool":  # the message answers the last reply's calls
            results = {call.id: text for call in calls}
            await self.begin_reply(lambda stop: chat.stream(
                tool_results=results, should_stop=stop, **options))
            return
        await self.begin_reply(lambda stop: chat.stream(text, sources, should_stop=stop,
                                                        **options))

    def unanswered_calls(self) -> list:
        """The last reply's tool calls, when the conversation ends with them."""
        messages = self.chat.messages if self.chat is not None else []
        if messages and messages[-1].role == "assistant":
            return list(messages[-1].tool_calls)
        return []

    async def wait_for_model(self, text: str) -> None:
        """A message sent while the model loads: shown as waiting, sent once it is ready."""
        self.waiting.append(text)
        conversation = self.query_one(Conversation)
        await conversation.mount(MessageView("user", text, graphics=self.graphics).wait())
        conversation.scroll_end(animate=False)

    async def send_waiting(self) -> None:
        """The oldest message that waited for the model, if there is one and nothing streams."""
        if not self.waiting or self.busy or self.chat is None:
            return
        text = self.waiting.pop(0)
        await self.waiting_views()[0].remove()
        await self.send(text)

    async def begin_reply(self, start: TurnStarter) -> None:
        self.busy = True
        self._stop.clear()
        self._ui_clock = (0.0, 0.0)
        self._reply = MessageView("assistant", graphics=self.graphics)
        await self.mount_message(self._reply)
        self.query_one(Conversation).follow()
        self._stream = self._reply.stream()
        self.update_status(Stats())
        self.generate(start)

    @work(thread=True, group="reply")
    def generate(self, start: TurnStarter) -> None:
        """Run the turn; post its text at most every `flush_seconds`, and its end."""
        pending: list[str] = []
        flushed = 0.0
        stats = None
        self._generating.set()
        try:
            for chunk in start(self._stop.is_set):
                stats = chunk.stats
                if chunk.text:
                    pending.append(chunk.text)
                now = time.perf_counter()
                due = now - flushed >= self.flush_seconds
                if pending and due and chunk.finish_reason is None:
                    self.post_message(ReplyText("".join(pending), replace(stats)))
                    pending.clear()
                    flushed = now
        except GemmaError as e:
            self.post_message(ReplyFailed(e))
            return
        finally:
            self._generating.clear()
        self.post_message(ReplyFinished("".join(pending), replace(stats) if stats else None))

    async def on_reply_text(self, message: ReplyText) -> None:
        self.pace_flushes()
        if self._stream is not None:
            await self._stream.write(message.text)
        self.query_one(Conversation).follow()
        self.update_status(message.stats)

    def pace_flushes(self) -> None:
        """Space the batches of text so that the main thread (drawing, layout) stays under
        UI_SHARE busy: its CPU time since the last batch, over the wall time."""
        wall, cpu = time.perf_counter(), time.thread_time()
        last_wall, last_cpu = self._ui_clock
        self._ui_clock = (wall, cpu)
        if not last_wall or wall <= last_wall:
            return
        share = (cpu - last_cpu) / (wall - last_wall)
        if share > UI_SHARE:
            self.flush_seconds = min(MAX_FLUSH_SECONDS, self.flush_seconds * 1.25)
        elif share < UI_SHARE / 2:
            self.flush_seconds = max(FLUSH_SECONDS, self.flush_seconds / 1.25)

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        assert self.chat is not None and self._reply is not None
        if self._stream is not None:
            await self._stream.write(message.text)
            await self._stream.stop()
        self._stream = None
        reply = self.chat.messages[-1]
        await self._reply.finish(reply.text, reply.stopped, reply.tool_calls)
        if reply.tool_calls:
            self.notify("type the result of the call (or of each, the same text) and press Enter",
                        title="Tool call", markup=False)
        self.query_one(Conversation).follow()
        self.busy = False
        self.last_stats = message.stats
        for view in self.message_views()[:-LIVE_MESSAGES]:
            await view.flatten()
        self.mark_dropped()
        self.update_status()
        self.show_notices()
        await self.send_waiting()

    async def on_reply_failed(self, message: ReplyFailed) -> None:
        if self._stream is not None:
            await self._stream.stop()
        self._stream = None
        self.busy = False
        await self.show_conversation()  # exactly what the Chat holds: the failure added nothing
        self.report(message.error)
        self.show_notices()
        await self.send_waiting()

    def mark_dropped(self) -> None:
        assert self.chat is not None
        for view in self.message_views()[:self.chat.first_turn]:
            view.add_class("-dropped")

    def show_notices(self) -> None:
        assert self.chat is not None
        while self.chat.notices:
            self.notify(self.chat.notices.pop(0), title="Note", severity="warning",
                        markup=False)

    def ready_for(self, what: str) -> bool:
        if self.chat is None:
            self.report(f"no model is loaded, so there is nothing to {what} with", "Not ready")
            return False
        if self.busy:
            self.report("a reply is still coming: wait for it, or press Esc to stop it",
                        "Busy")
            return False
        return True

    def attach(self, path: str) -> None:
        if self.model is None:
            self.report("wait for the model to load before attaching images", "Not ready")
            return
        if not self.model.config.has_vision:
            self.report(f"{self.model.name} takes text only: start the app with a vision model "
                        "(4b, 12b, 27b) to send images", "Text-only model")
            return
        try:
            attachment = Attachment.load(Path(path).expanduser())
        except GemmaError as e:
            self.report(e)
            return
        attachment.source = path
        self.pending.append(attachment)
        self.query_one(AttachmentBar).show(self.pending)

    async def on_unmount(self) -> None:
        """Let a streaming reply stop, then drop the model and the conversation here, in the
        main thread. MLX arrays made in a worker thread (the KV cache, a model loaded by name)
        that are still alive when Python exits abort it (MLX 0.32 on the CPU: "terminate
        called without an active exception")."""
        self._stop.set()
        while self._generating.is_set():
            await asyncio.sleep(0.01)
        self.chat = None
        self.model = None
        gc.collect()

    # ---- keys ---------------------------------------------------------------------------

    def action_stop_reply(self) -> None:
        """Esc: stop the reply; else close the completion list."""
        if self.busy:
            self._stop.set()
        else:
            self.query_one(CompletionList).display = False

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_quit_twice(self) -> None:
        now = time.monotonic()
        self.action_stop_reply()
        if now - self._quit_armed_at <= QUIT_WINDOW_SECONDS:
            self.leave()
            return
        self._quit_armed_at = now
        self.notify("Press Ctrl+C again to quit", timeout=QUIT_WINDOW_SECONDS)

    def leave(self) -> None:
        self._stop.set()
        self.exit(self.return_code_on_quit, return_code=self.return_code_on_quit)

    # ---- slash commands -----------------------------------------------------------------

    def palette_command(self, name: str) -> None:
        command = BY_NAME[name]
        if command.needs_argument:
            self.query_one(Composer).set_text(f"/{name} ")
            self.query_one(Composer).focus()
        else:
            self.run_worker(self.run_command(f"/{name}"))

    async def run_command(self, text: str) -> None:
        typed = parse(text)
        if typed.command is None:
            self.report(f"/{typed.name} is not a command: /help lists them", "Unknown command")
            return
        if typed.name not in ("help", "quit"):
            if self.chat is None:
                self.report(f"/{typed.name} needs a loaded model", "Not ready")
                return
            if self.busy and not typed.command.while_busy:
                self.report(f"/{typed.name} must wait until the reply is done (Esc stops it)",
                            "Busy")
                return
        handler = getattr(self, f"command_{typed.name}")
        await handler(typed.argument)

    async def command_help(self, argument: str) -> None:
        self.action_help()

    async def command_quit(self, argument: str) -> None:
        self.leave()

    async def command_image(self, argument: str) -> None:
        if argument == "-":
            self.pending.clear()
            self.query_one(AttachmentBar).show(self.pending)
        elif not argument:
            self.report("give the image's path: /image PATH", "Usage")
        else:
            self.attach(argument)

    async def command_clear(self, argument: str) -> None:
        assert self.chat is not None
        self.chat.clear()
        self.last_stats = None
        await self.show_conversation()

    async def command_system(self, argument: str) -> None:
        assert self.chat is not None
        if not argument:
            current = self.chat.system
            self.tell(current if current else "no system prompt (set one with /system TEXT)",
                      "System prompt")
            return
        self.chat.system = None if argument == "-" else argument
        self.update_status()
        self.tell("removed" if argument == "-" else argument, "System prompt")

    async def command_retry(self, argument: str) -> None:
        assert self.chat is not None
        chat = self.chat
        if not chat.messages or chat.messages[-1].role != "assistant":
            self.report("there is no reply to retry yet", "Nothing to retry")
            return
        views = self.message_views()
        if views and views[-1].role == "assistant":
            await views[-1].remove()
        await self.begin_reply(lambda stop: chat.retry(should_stop=stop))

    async def command_undo(self, argument: str) -> None:
        assert self.chat is not None
        message = self.chat.undo()
        if message is None:
            self.report("there is nothing to undo", "Nothing to undo")
            return
        await self.show_conversation()
        self.query_one(Composer).set_text(message.text)
        self.pending = list(message.images)
        self.query_one(AttachmentBar).show(self.pending)

    async def command_save(self, argument: str) -> None:
        assert self.chat is not None
        path = argument or datetime.now().strftime("gemma-chat-%Y%m%d-%H%M%S.json")
        try:
            saved = self.chat.save(Path(path).expanduser())
        except OSError as e:
            self.report(f"could not save to {path} ({e.strerror or e}): choose another path",
                        "Not saved")
            return
        self.tell(f"saved to {saved}", "Saved")

    async def command_load(self, argument: str) -> None:
        assert self.chat is not None and self.model is not None
        if not argument:
            self.report("give the saved chat's path: /load PATH", "Usage")
            return
        try:
            chat = Chat.load(Path(argument).expanduser(), self.model, **self._chat_options())
        except GemmaError as e:
            self.report(e)
            return
        self.chat = chat
        self.last_stats = None
        await self.show_conversation()
        self.tell(f"{len(chat.messages)} messages from {argument}", "Loaded")

    async def command_set(self, argument: str) -> None:
        assert self.chat is not None
        settings = self.chat.settings
        name, _, value = argument.partition(" ")
        value = value.strip()
        if not name:
            shown = ", ".join(f"{s} {getattr(settings, s)}" for s in SETTINGS)
            self.tell(shown, "Settings")
            return
        if name not in SETTINGS or not value:
            self.report(f"use /set {'|'.join(SETTINGS)} VALUE", "Usage")
            return
        kind = SETTINGS[name]
        try:
            new = kind(value)
        except ValueError:
            kinds = "a whole number" if kind is int else "a number"
            self.report(f"{name} takes {kinds}, not '{value}'", "Bad value")
            return
        old = getattr(settings, name)
        setattr(settings, name, new)
        try:
            settings.validate()
        except GemmaError as e:
            setattr(settings, name, old)
            self.report(e, "Bad value")
            return
        self.tell(f"{name} = {new}", "Settings")

    async def command_stats(self, argument: str) -> None:
        assert self.chat is not None
        lines = [f"context {self.chat.tokens_used:,} / {self.chat.context_limit:,} tokens"]
        if self.last_stats is not None:
            lines.append(self.last_stats.summary())
        else:
            lines.append("no reply yet")
        self.tell("\n".join(lines), "Stats")

    async def command_copy(self, argument: str) -> None:
        assert self.chat is not None
        replies = [m for m in self.chat.messages if m.role == "assistant"]
        if not replies:
            self.report("there is no reply to copy yet", "Nothing to copy")
            return
        self.copy_to_clipboard(replies[-1].text)
        self.tell(f"copied the last reply ({len(replies[-1].text)} characters)", "Copied")


def run(model: str | Model = "4b", **options: Any) -> int:
    """Run the app in this terminal; returns its exit code. The terminal is taken over first
    (keys typed from then on are kept for the composer) and given back as it was."""
    with take_over() as terminal:
        app = ChatApp(model, terminal=terminal, **options)
        app.run()
    code = app.return_code or 0
    # Free what the app's reference cycles still hold before Python exits (see on_unmount).
    del app
    gc.collect()
    return code
