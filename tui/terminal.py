"""The real terminal around the app: taking it over before Textual does, asking it what it can
draw, and keeping its replies out of what was typed.

A terminal answers queries on the same stream that carries the keys: Textual asks for
synchronized output at start-up, we ask for graphics support, and the replies can come late
(a busy machine), split across reads, or mixed with keys typed meanwhile. Textual's parser turns
the replies it does not know (device attributes `ESC [ ? 1 ; 2 c`, for one) into key presses,
which then land in the composer as text. So every byte the app reads goes through one
`ReplyFilter`, from the first read at start-up to the last in Textual's input thread.

textual-image asks its own questions when imported (device attributes, a Kitty graphics query,
the cell size), each read byte by byte from stdin with a 0.1 s timeout: it eats keys typed
meanwhile and leaves late replies behind. We import it with stdout pointing away from the
terminal, so that it asks nothing, and tell it what our own questions found.
"""

from __future__ import annotations

import os
import re
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from textual import constants

ESC = "\x1b"
BEL = "\x07"
ESCAPE_DELAY = constants.ESCAPE_DELAY  # a lone ESC is the Esc key after this (Textual's ESCDELAY)
REPLY_HOLD = 2.0  # seconds a begun reply may take to arrive whole (a busy terminal)
ANSWER_TIMEOUT = 1.0  # for the terminal to answer our start-up questions
MAX_STRING = 1 << 16  # an OSC, DCS or APC string longer than this is dropped as it comes

# Replies that Textual asked for and parses itself: they go on to it.
TEXTUAL_MODE_REPORT = re.compile(r"\?(2026|2048);\d")  # DECRPM: the modes Textual asks about
NUMBERS = re.compile(r"\d+(;\d*)*")  # the parameters of a reply (in-band resize: 48;...)

# What may follow the introducer of a string reply: OSC `ESC ] 11;rgb:...`, DCS `ESC P 1$r...`,
# `ESC P >|xterm(...)`, APC `ESC _ G i=1;OK` (Kitty graphics).
STRING_REPLY_STARTS = {"]": "0123456789", "P": "0123456789>!=$+|", "_": "G"}

GROUND, ESCAPE, CSI, STRING_INTRO, STRING = range(5)


def is_csi_reply(body: str) -> bool:
    """Whether `ESC [ body` is a terminal's reply rather than a key or a mouse event. Keys and
    mouse events never carry the private markers ? > =, and never end in numbers and one of
    n, t, x or $y."""
    params = body[:-1].rstrip(" !\"#$%&'()*+,-./")
    intermediates, final = body[len(params):-1], body[-1]
    if params[:1] in ("?", ">", "="):
        return not (final == "y" and intermediates == "$" and TEXTUAL_MODE_REPORT.fullmatch(params))
    if not NUMBERS.fullmatch(params):
        return False
    if final == "y":
        return intermediates == "$"
    if final == "t":
        return not params.startswith("48;")  # Textual's in-band resize
    if final == "R":
        # Also what xterm sends for a modified F3 (`ESC [ 1 ; 2 R`), which Textual's parser has
        # always read as a cursor position: nothing is lost here.
        return params.count(";") == 1
    return final in "nx" and not intermediates


class ReplyFilter:
    """Gives back what was typed, without the terminal's replies: device attributes, mode
    reports Textual did not ask for, cursor positions, window reports, DSR, Kitty keyboard
    flags, OSC, DCS and APC strings. It keeps a begun sequence until it is whole (or until
    REPLY_HOLD, a lone ESC until ESCAPE_DELAY), so a reply split across reads is still seen.
    `replies` keeps the latest replies, for whoever asked."""

    def __init__(self, escape_delay: float = ESCAPE_DELAY, hold: float = REPLY_HOLD) -> None:
        self.escape_delay = escape_delay
        self.hold = hold
        self.replies: deque[str] = deque(maxlen=32)
        self._state = GROUND
        self._pending = ""  # the sequence begun
        self._since = 0.0  # when it began
        self._string_esc = False  # an ESC inside a string: ST (ESC \) comes next
        self._orphan = False  # the pending sequence's ESC was already given out as the Esc key
        self._orphan_until = 0.0  # a reply's tail may follow a lone ESC given out until then

    def feed(self, text: str, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        out: list[str] = []
        for char in text:
            self._step(char, now, out)
        return "".join(out)

    def flush(self, now: float | None = None) -> str:
        """What is held longer than it may be: a lone ESC becomes the Esc key, a begun key
        sequence goes on as it is, a begun reply is dropped."""
        now = time.monotonic() if now is None else now
        if self._state == GROUND:
            return ""
        limit = self.escape_delay if self._state == ESCAPE else self.hold
        if now - self._since < limit:
            return ""
        if self._state == ESCAPE:
            self._give(out := [], self._pending)
            self._orphan_until = now + self.hold
            return "".join(out)
        if self._state == STRING or (self._state == CSI and self._pending[2:3] in ("?", ">", "=")):
            self.replies.append(self._pending)
            self._reset()
            return ""
        self._give(out := [], self._pending)
        return "".join(out)

    def _reset(self) -> None:
        self._state, self._pending, self._string_esc, self._orphan = GROUND, "", False, False

    def _begin(self, now: float) -> None:
        self._state, self._pending, self._since, self._orphan = ESCAPE, ESC, now, False

    def _give(self, out: list[str], text: str) -> None:
        out.append(text[1:] if self._orphan else text)  # an orphan's ESC went out already
        self._reset()

    def _step(self, char: str, now: float, out: list[str]) -> None:
        state = self._state
        if state == GROUND:
            orphan = now < self._orphan_until and char in "[]P_"
            self._orphan_until = 0.0
            if char == ESC:
                self._begin(now)
            elif orphan:  # a reply whose ESC came alone, too long ago: read on as its tail
                self._begin(now)
                self._orphan = True
                self._step(char, now, out)
            else:
                out.append(char)
        elif state == ESCAPE:
            if char == "[":
                self._state, self._pending = CSI, self._pending + char
            elif char in STRING_REPLY_STARTS:
                self._state, self._pending = STRING_INTRO, self._pending + char
            elif char == ESC:  # the Esc key, then a new sequence
                self._give(out, self._pending)
                self._begin(now)
            else:  # Alt+key and the like
                self._give(out, self._pending + char)
        elif state == CSI:
            self._step_csi(char, now, out)
        elif state == STRING_INTRO:
            if char in STRING_REPLY_STARTS[self._pending[-1]]:
                self._state, self._pending = STRING, self._pending + char
            elif char == ESC:
                self._give(out, self._pending)
                self._begin(now)
            else:
                self._give(out, self._pending + char)
        else:
            self._step_string(char, now, out)

    def _step_csi(self, char: str, now: float, out: list[str]) -> None:
        code = ord(char)
        if 0x20 <= code <= 0x3F:  # parameters and intermediates
            self._pending += char
        elif 0x40 <= code <= 0x7E:  # the final byte
            sequence = self._pending + char
            if is_csi_reply(sequence[2:]):
                self.replies.append(sequence)
                self._reset()
            else:
                self._give(out, sequence)
        elif char == ESC:
            self._give(out, self._pending)
            self._begin(now)
        else:  # a control character: not a reply
            self._give(out, self._pending + char)

    def _step_string(self, char: str, now: float, out: list[str]) -> None:
        if self._string_esc:
            if char == "\\":  # ST: the string is whole
                self.replies.append(self._pending + char)
                self._reset()
            else:  # an unterminated string, then a new sequence
                self.replies.append(self._pending[:-1])
                self._reset()
                self._begin(now)
                self._step(char, now, out)
        elif char == ESC:
            self._string_esc = True
            self._pending += char
        elif char == BEL and self._pending[1] == "]":
            self.replies.append(self._pending + char)
            self._reset()
        elif len(self._pending) < MAX_STRING:
            self._pending += char


# ---- taking the terminal over -------------------------------------------------------------

@dataclass
class Terminal:
    """The terminal the app runs in, as start-up found it: what it can draw, the keys typed
    before the app could take them, the filter its input goes through, and `ready`, which the
    app sets once its composer can take keys (Textual's input thread waits for it)."""

    fd: int
    attributes: list[Any]  # the termios attributes to give back at the end
    typed: str = ""
    graphics: str = "halfcell"  # "sixel", "tgp" (Kitty's protocol) or "halfcell"
    cell_size: tuple[int, int] | None = None  # in pixels (width, height), where it says
    replies: ReplyFilter = field(default_factory=ReplyFilter)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def driver_class(self) -> type:
        return type("ChatDriver", (ChatDriver,), {"terminal": self})


def input_mode(attributes: list[Any]) -> list[Any]:
    """Keys one by one, unechoed, Enter as CR (as Textual sets them); Ctrl+C still interrupts
    until Textual takes over."""
    import termios

    mode = [*attributes[:6], list(attributes[6])]
    mode[0] &= ~(termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON | termios.IXOFF)
    mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)
    mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
    return mode


def read_ready(fd: int, timeout: float) -> str:
    """What can be read within `timeout` (bytes decoded as UTF-8; a split character is kept
    whole by reading on)."""
    data = b""
    while select.select([fd], [], [], timeout)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        timeout = 0.0
        try:
            return data.decode()
        except UnicodeDecodeError:
            timeout = 0.05
    return data.decode(errors="replace")


@contextmanager
def take_over() -> Iterator[Terminal | None]:
    """Put the terminal in the app's input mode and ask it what it can draw; give it back as
    it was at the end. None where stdin and stdout are not both a terminal."""
    stdin, stdout = sys.__stdin__, sys.__stdout__
    if sys.platform == "win32" or not (stdin and stdout and stdin.isatty() and stdout.isatty()):
        yield None
        return
    import termios

    fd = stdin.fileno()
    attributes = termios.tcgetattr(fd)
    try:
        termios.tcsetattr(fd, termios.TCSANOW, input_mode(attributes))
        terminal = Terminal(fd, attributes)
        # Typed before now, in the terminal's line mode, which turned Enter into LF.
        terminal.typed = terminal.replies.feed(read_ready(fd, 0.0).replace("\n", "\r"))
        ask(terminal, stdout.fileno())
        import_images(terminal.cell_size)
        yield terminal
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, attributes)


def ask(terminal: Terminal, out: int) -> None:
    """Ask for the cell size (where the window size does not say), Kitty graphics and the
    device attributes, last: every terminal answers those, in order, so once they are in, so
    is every other answer there will be. Keys typed meanwhile are kept."""
    import fcntl
    import struct
    import termios

    rows, columns, width, height = struct.unpack(
        "HHHH", fcntl.ioctl(out, termios.TIOCGWINSZ, b"\0" * 8))
    if rows and columns and width and height:
        terminal.cell_size = (width // columns, height // rows)
    questions = "" if terminal.cell_size else f"{ESC}[16t"
    questions += f"{ESC}_Gi=31,s=1,v=1,a=q,t=d,f=24;AAAA{ESC}\\" + f"{ESC}[c"
    replies = terminal.replies.replies
    replies.clear()  # earlier replies (typed-ahead ones, say) answer nothing of ours
    os.write(out, questions.encode())
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        terminal.typed += terminal.replies.feed(read_ready(terminal.fd, min(left, 0.05)))
        while replies:
            answer = replies.popleft()
            learn(terminal, answer)
            if is_device_attributes(answer):
                return


def is_device_attributes(reply: str) -> bool:
    return reply.startswith(f"{ESC}[?") and reply.endswith("c")


def learn(terminal: Terminal, reply: str) -> None:
    if is_device_attributes(reply) and "4" in reply[3:-1].split(";"):
        terminal.graphics = "sixel"
    elif reply.startswith(f"{ESC}_Gi=31;") and reply[:-2].endswith(";OK"):
        if terminal.graphics != "sixel":  # textual-image's order: Sixel first
            terminal.graphics = "tgp"
    elif match := re.fullmatch(rf"{re.escape(ESC)}\[6;(\d+);(\d+)t", reply):
        height, width = int(match[1]), int(match[2])
        if width and height:
            terminal.cell_size = (width, height)


# ---- Textual's input, through the filter ----------------------------------------------------

if sys.platform != "win32":
    from codecs import getincrementaldecoder

    from textual._xterm_parser import XTermParser
    from textual.drivers.linux_driver import LinuxDriver

    class ChatDriver(LinuxDriver):
        """Textual's terminal driver, but its input goes through the terminal's ReplyFilter,
        starts with the keys typed before, and is read only once the app can take it (keys
        before that would reach no widget and be lost): until then it waits in the terminal."""

        terminal: Terminal

        def start_application_mode(self) -> None:
            super().start_application_mode()
            self.attrs_before = self.terminal.attributes  # what a suspend or exit gives back

        def run_input_thread(self) -> None:
            terminal = self.terminal
            while not terminal.ready.wait(0.05):
                if self.exit_event.is_set():
                    return
            parser = XTermParser(self._debug)
            decode = getincrementaldecoder("utf-8")().decode
            replies = terminal.replies

            def give(text: str) -> None:
                for event in parser.feed(text) if text else ():
                    self.process_message(event)
                for event in parser.tick():
                    self.process_message(event)

            typed, terminal.typed = terminal.typed, ""  # filtered as it was read
            give(typed)
            try:
                while not self.exit_event.is_set():
                    if select.select([self.fileno], [], [], 0.1)[0]:
                        data = os.read(self.fileno, 4096)
                        if not data:
                            break
                        give(replies.feed(decode(data)))
                    give(replies.flush())
            finally:
                try:
                    for _ in parser.feed(""):
                        pass
                except Exception:  # the parser at end of input; as Textual's own driver
                    pass
else:  # pragma: no cover
    ChatDriver = None  # type: ignore[assignment,misc]


# ---- textual-image ----------------------------------------------------------------------------

_image_widgets: dict[str, type] = {}


class _NotATerminal:
    """What textual-image sees as stdout while it is imported: not a terminal, so it asks
    nothing."""

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def import_images(cell_size: tuple[int, int] | None = None) -> dict[str, type]:
    """textual-image's widgets by kind ("sixel", "tgp", "halfcell", "unicode"), imported once
    without its terminal queries; `cell_size` (pixels) is what it then assumes."""
    if _image_widgets:
        return _image_widgets
    names = ("TEXTUAL_CELL_WIDTH", "TEXTUAL_CELL_HEIGHT")  # textual-serve's, read by it
    told = cell_size is not None and not any(name in os.environ for name in names)
    if told:
        os.environ[names[0]], os.environ[names[1]] = str(cell_size[0]), str(cell_size[1])
    saved_stdout, sys.__stdout__ = sys.__stdout__, _NotATerminal()  # type: ignore[assignment]
    try:
        from textual_image.widget import HalfcellImage, SixelImage, TGPImage, UnicodeImage
    finally:
        sys.__stdout__ = saved_stdout
        for name in names if told else ():
            del os.environ[name]
    _image_widgets.update(sixel=SixelImage, tgp=TGPImage, halfcell=HalfcellImage,
                          unicode=UnicodeImage)
    return _image_widgets


def image_widget(kind: str) -> type:
    """The widget class for pictures of `kind`; "auto" where start-up asked nothing: cells,
    half a cell per pixel row in a terminal, characters elsewhere (as textual-image does)."""
    if kind == "auto":
        stdout = sys.__stdout__
        kind = "halfcell" if stdout is not None and stdout.isatty() else "unicode"
    return import_images()[kind]
