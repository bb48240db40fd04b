"""The chat app's widgets, each named for what it shows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.markdown import Markdown as RichMarkdown
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Label, Markdown, OptionList, ProgressBar, Static, TextArea
from textual.widgets.markdown import MarkdownStream
from textual.widgets.option_list import Option

from gemma_mlx import Attachment, Model, Stats

from .commands import Completion, image_path_in
from .terminal import image_widget

THUMBNAIL_ROWS = 8
ROLE_NAMES = {"user": "You", "assistant": "Gemma", "tool": "Tool result"}
NO_TEXT = "*(no text)*"


class ImageThumbnail(Vertical):
    """An attached picture, small, with its file name: drawn with the terminal's graphics
    protocol where it has one, else in coloured half cells. `graphics`: "auto", "sixel",
    "tgp", "halfcell" or "unicode" (see terminal.image_widget)."""

    def __init__(self, attachment: Attachment, graphics: str = "auto") -> None:
        super().__init__(classes="thumbnail")
        self.attachment = attachment
        self.graphics = graphics

    def compose(self):
        image = self.attachment.image
        # Cells are about twice as tall as wide: size it here so every terminal (and every
        # test) draws the same number of cells.
        width = max(1, round(THUMBNAIL_ROWS * 2 * image.width / max(1, image.height)))
        picture = image_widget(self.graphics)(image, classes="picture")
        picture.styles.width = min(width, 48)
        picture.styles.height = THUMBNAIL_ROWS
        yield picture
        yield Label(attachment_name(self.attachment), classes="caption", markup=False)


def attachment_name(attachment: Attachment) -> str:
    source = attachment.source or f"image {attachment.hash[:8]}"
    return source.replace("\\", "/").rsplit("/", 1)[-1]


class MessageView(Vertical):
    """One message: who said it, its pictures, and its text (replies as Markdown, streamed).

    A reply is a tree of Markdown widgets, and every frame lays out every widget of the
    conversation: older replies are `flat` (one widget drawing the same Markdown through Rich)
    so that a long conversation does not slow the drawing of a streaming reply."""

    def __init__(self, role: str, text: str = "", images: Sequence[Attachment] = (),
                 stopped: bool = False, graphics: str = "auto", flat: bool = False,
                 tool_calls: Sequence[Any] = ()) -> None:
        super().__init__(classes=f"message -{role}")
        self.role = role
        self.text = text
        self.images = list(images)
        self.tool_calls = list(tool_calls)
        self.graphics = graphics
        self.flat = flat
        self.set_class(stopped, "-stopped")

    def compose(self):
        yield Label(ROLE_NAMES[self.role], classes="role")
        if self.images:
            with Horizontal(classes="thumbnails"):
                for attachment in self.images:
                    yield ImageThumbnail(attachment, self.graphics)
        if self.text.strip() or not self.tool_calls:
            yield self._body()
        yield from (CallBlock(call) for call in self.tool_calls)
        yield Label("■ stopped", classes="stopped-mark")
        yield Label("… waiting for the model to load", classes="waiting-mark")

    def _body(self) -> Static | Markdown:
        if self.role in ("user", "tool"):
            return Static(self.text, classes="body", markup=False)
        if self.flat:
            return Static(RichMarkdown(self.text if self.text.strip() else NO_TEXT),
                          classes="body flat")
        return Markdown(self.text if self.text.strip() else NO_TEXT, classes="body")

    async def flatten(self) -> None:
        if self.role == "assistant" and not self.flat and self.query(".body"):
            self.flat = True
            await self.query_one(".body").remove()
            await self.mount(self._body(), before=self.query_one(".stopped-mark"))

    def wait(self) -> MessageView:
        """Show it as typed before the model was ready: it goes out once it is."""
        self.add_class("-waiting")
        return self

    def unsent(self, reason: str) -> None:
        self.add_class("-unsent")
        self.query_one(".waiting-mark", Label).update(f"✗ not sent: {reason}")

    def stream(self) -> MarkdownStream:
        return Markdown.get_stream(self.query_one(Markdown))

    async def finish(self, text: str, stopped: bool, tool_calls: Sequence[Any] = ()) -> None:
        """The reply is complete: show exactly the text the conversation holds, and its calls
        as call blocks (never as the raw call syntax)."""
        self.text = text
        self.tool_calls = list(tool_calls)
        body = self.query_one(Markdown)
        if self.tool_calls and not text.strip():
            await body.remove()
        elif body.source != text:
            await body.update(text)
        if not text.strip() and not self.tool_calls:
            await body.update(NO_TEXT)
        for call in self.tool_calls:
            await self.mount(CallBlock(call), before=self.query_one(".stopped-mark"))
        self.set_class(stopped, "-stopped")


class CallBlock(Static):
    """A tool call the model made: the function's name and its arguments."""

    def __init__(self, call: Any) -> None:
        arguments = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}"
                              for k, v in call.arguments.items())
        super().__init__(f"⚙ {call.name}({arguments})", classes="tool-call", markup=False)
        self.call = call


class Conversation(VerticalScroll):
    """The messages, oldest first; it follows a streaming reply unless scrolled up."""

    def follow(self) -> None:
        """Keep to the end as content arrives, once there is more than fits. (Anchoring
        earlier would draw a short conversation at the bottom of the screen.)"""
        self.call_after_refresh(self._anchor_if_overflowing)

    def restart(self) -> None:
        """After the content was replaced: back to the top until it overflows again."""
        self.anchor(False)
        self.scroll_home(animate=False, immediate=True)
        self.follow()

    def _anchor_if_overflowing(self) -> None:
        if not self.is_anchored and self.max_scroll_y > 0:
            self.anchor()


class Composer(TextArea):
    """Where messages are written. Enter sends; Shift+Enter or Ctrl+J starts a new line; Up on
    the first line and Down on the last recall earlier messages; Tab completes commands."""

    BINDINGS = [Binding("tab", "complete", "Complete", show=False)]

    @dataclass
    class Submitted(Message):
        text: str

    class CompletionRequested(Message):
        pass

    @dataclass
    class ImagePasted(Message):
        path: str

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, **kwargs)
        self.past_messages: list[str] = []
        self._recall_index: int | None = None  # index into history while recalling
        self._unsent = ""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.submit()
        elif event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")

    async def _on_paste(self, event: events.Paste) -> None:
        path = image_path_in(event.text)
        if path is not None:
            event.stop()
            event.prevent_default()
            self.post_message(self.ImagePasted(str(path)))

    def submit(self) -> None:
        text = self.text
        if not text.strip():
            return
        if not self.past_messages or self.past_messages[-1] != text:
            self.past_messages.append(text)
        self._recall_index = None
        self.clear()
        self.post_message(self.Submitted(text))

    def set_text(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    def action_complete(self) -> None:
        self.post_message(self.CompletionRequested())

    def action_cursor_up(self, select: bool = False) -> None:
        if select or self.cursor_location[0] > 0 or not self._recall(-1):
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        last_line = self.document.line_count - 1
        if select or self.cursor_location[0] < last_line or not self._recall(+1):
            super().action_cursor_down(select)

    def _recall(self, step: int) -> bool:
        """Move through the history; False when there is nowhere to go."""
        if self._recall_index is None:
            if step > 0 or not self.past_messages:
                return False
            self._unsent = self.text
            index = len(self.past_messages) - 1
        else:
            index = self._recall_index + step
            if index < 0:
                return True  # the oldest is showing: stay on it
        if index >= len(self.past_messages):
            self._recall_index = None
            self.set_text(self._unsent)
        else:
            self._recall_index = index
            self.set_text(self.past_messages[index])
        return True


class CompletionList(OptionList):
    """What Tab can complete the composer's text to (commands, settings, paths)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.can_focus = False
        self.candidates: list[Completion] = []

    def show(self, candidates: list[Completion]) -> None:
        self.candidates = candidates
        self.clear_options()
        self.add_options([Option(self._label(c)) for c in candidates])
        self.display = bool(candidates)

    def point_at(self, value: str) -> None:
        values = [c.value for c in self.candidates]
        if value in values:
            self.highlighted = values.index(value)

    @staticmethod
    def _label(completion: Completion) -> Text:
        label = Text(completion.label, style="bold")
        if completion.help:
            label.append(f"  {completion.help}", style="dim")
        return label


class AttachmentBar(Static):
    """The images waiting to go with the next message."""

    def show(self, attachments: Sequence[Attachment]) -> None:
        names = ", ".join(attachment_name(a) for a in attachments)
        self.update(Text(f"attached to your next message: {names}  (/image - drops them)"))
        self.display = bool(attachments)


@dataclass
class StatusInfo:
    model: str = ""
    tokens_used: int = 0
    context_limit: int = 0
    stats: Stats | None = None  # the last (or the streaming) reply's
    streaming: bool = False


class StatusBar(Widget):
    """Model and quantization, context used, and the last reply's speed and memory. One line
    of fixed height: updating it repaints the line without a new layout, which matters while
    a reply streams."""

    def __init__(self, show_timings: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.show_timings = show_timings
        self.line = Text("")

    def render(self) -> Text:
        return self.line

    def show(self, info: StatusInfo) -> None:
        parts = [info.model or "no model",
                 f"{info.tokens_used:,}/{info.context_limit:,} tok"]
        stats = info.stats
        if stats is not None and info.streaming:
            speed = f" at {stats.decode_tps:.1f} tok/s" if self.show_timings else ""
            parts.append(f"replying: {stats.generated_tokens} tok{speed} (Esc stops)")
        elif stats is not None:
            if self.show_timings:
                parts.append(f"prompt {stats.prompt_tps:.0f}, decode {stats.decode_tps:.1f} "
                             f"tok/s, first token {stats.time_to_first_token:.2f} s")
                parts.append(f"peak {stats.peak_memory / 2**30:.2f} GB")
            else:
                parts.append(f"last reply {stats.generated_tokens} tok")
        self.line = Text(" │ ".join(parts), no_wrap=True, overflow="ellipsis")
        self.refresh()


class LoadingPanel(Vertical):
    """While the model loads: what is happening and the Hub download's progress; if it
    fails, the reason and the fix."""

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_name = name
        self.bars: dict[int, tuple[Label, ProgressBar]] = {}

    def compose(self):
        yield Label(f"Loading {self.model_name}…", classes="title", markup=False)
        yield ProgressBar(total=None, show_eta=False, show_percentage=False, classes="busy")
        yield Static("", classes="reason", markup=False)
        yield Static("", classes="fix", markup=False)

    def progress(self, bar_id: int, description: str, done: float, total: float | None,
                 unit: str) -> None:
        if bar_id not in self.bars:
            row = (Label(markup=False), ProgressBar(show_eta=False))
            self.bars[bar_id] = row
            self.mount_all(row, before=self.query_one(".reason"))
        label, bar = self.bars[bar_id]
        amount = (f"{_size(done)} / {_size(total)}" if unit == "B" and total
                  else f"{done:,.0f} / {total:,.0f}" if total else f"{done:,.0f}")
        label.update(f"{description or 'Downloading'}: {amount}")
        bar.update(total=total or None, progress=done)

    def failed(self, reason: str, fix: str) -> None:
        self.add_class("-failed")
        self.query_one(".title", Label).update(f"Could not load {self.model_name}")
        self.query_one(".reason", Static).update(reason)
        self.query_one(".fix", Static).update(fix)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def welcome_text(model: Model) -> str:
    lines = [f"**{model.description}** is ready. Type a message and press **Enter**; "
             "**Shift+Enter** (or Ctrl+J) adds a line, **Esc** stops a reply, **/help** lists "
             "the commands, **Ctrl+P** opens the command palette."]
    if model.config.has_vision:
        lines.append("Attach images with **/image PATH**, or paste or drop an image file.")
    else:
        lines.append(f"{model.name} reads text only.")
    if not model.has_chat_template:
        lines.append(f"{model.name} is a base model (no chat template): its replies continue "
                     "the text rather than answer it.")
    return "\n\n".join(lines)


class Welcome(Markdown):
    """What the empty conversation shows: the model and how to begin."""


__all__ = [
    "AttachmentBar", "CompletionList", "Composer", "Conversation", "ImageThumbnail",
    "LoadingPanel", "MessageView", "StatusBar", "StatusInfo", "Welcome", "welcome_text",
]
