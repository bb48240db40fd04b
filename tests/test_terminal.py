"""The chat app in a real terminal: a pseudo-terminal (pexpect) read through a terminal
emulator (pyte), as a person sees it, with the emulator answering the queries a terminal
answers. Also the filter that keeps the terminal's replies out of the input, on its own.

Everything waits on what the screen shows, within generous bounds, and each test is bounded
as a whole: the machine may be slow and busy."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tui.terminal import ESC, ReplyFilter

ROOT = Path(__file__).resolve().parent.parent
ROWS, COLUMNS = 30, 100
DEVICE_ATTRIBUTES = f"{ESC}[?1;2c"  # tmux's answer to `ESC [ c`
CURSOR_POSITION = f"{ESC}[12;40R"
FOOTER = "esc Stop reply"  # the app's key bar: on every frame
SYNC_BEGIN, SYNC_END = f"{ESC}[?2026h", f"{ESC}[?2026l"
APC_STRING = re.compile(re.escape(ESC) + r"_.*?" + re.escape(ESC) + r"\\", re.S)
# What a reply would leave on the screen if it got through: its text, or the terminal's echo.
LEAKS = re.compile(r"\^\[|\x1b|\[\?|\?\d+;|\d;\d+[cRty]|\?6c|\$y|Gi=31")


# ---- the filter -------------------------------------------------------------------------------

REPLIES = [
    f"{ESC}[?1;2c", f"{ESC}[?62;4;22c", f"{ESC}[>0;276;0c", f"{ESC}[?6c",  # device attributes
    f"{ESC}[12;40R", f"{ESC}[?3;7;1R",  # cursor position
    f"{ESC}[?1004;1$y", f"{ESC}[4;2$y",  # mode reports Textual did not ask for
    f"{ESC}[6;20;10t", f"{ESC}[4;600;1000t", f"{ESC}[8;30;100t",  # window reports
    f"{ESC}[0n", f"{ESC}[?997;1n", f"{ESC}[?11u",  # status, colour scheme, Kitty keyboard flags
    f"{ESC}]11;rgb:0000/0000/0000{ESC}\\", f"{ESC}]10;rgb:ffff/ffff/ffff\x07",  # OSC
    f"{ESC}P>|xterm(390){ESC}\\", f"{ESC}P1$r0m{ESC}\\",  # DCS: version, DECRQSS
    f"{ESC}_Gi=31;OK{ESC}\\", f"{ESC}_Gi=31;EINVAL:bad{ESC}\\",  # APC: Kitty graphics
]
INPUT = [
    "hello", "é✓", "\r", "\t", "\x7f", "\x03",
    f"{ESC}[A", f"{ESC}[1;5C", f"{ESC}OP", f"{ESC}[15~", f"{ESC}[97;5u", f"{ESC}[13;2u",
    f"{ESC}a", f"{ESC}[<0;12;5M", f"{ESC}[<64;3;4M", f"{ESC}[I", f"{ESC}[O",
    f"{ESC}[200~pasted [?1;2c text{ESC}[201~",
    f"{ESC}[?2026;2$y", f"{ESC}[?2048;1$y", f"{ESC}[48;30;100;600;1000t",  # for Textual
]


@pytest.mark.parametrize("reply", REPLIES)
def test_replies_are_taken_out_of_the_input(reply):
    f = ReplyFilter()
    assert f.feed(f"ab{reply}cd", now=0.0) == "abcd"
    assert list(f.replies) == [reply]


@pytest.mark.parametrize("typed", INPUT)
def test_keys_mouse_and_what_textual_asked_for_go_through(typed):
    f = ReplyFilter()
    assert f.feed(typed, now=0.0) == typed
    assert not f.replies


def test_replies_split_anywhere_and_mixed_with_keys():
    stream = "".join(f"k{i}{reply}" for i, reply in enumerate(REPLIES)) + f"{ESC}[Aend"
    keys = "".join(f"k{i}" for i in range(len(REPLIES))) + f"{ESC}[Aend"
    for cut in range(len(stream) + 1):
        f = ReplyFilter()
        got = f.feed(stream[:cut], now=0.0) + f.flush(0.05) + f.feed(stream[cut:], now=0.09)
        assert got == keys, cut
        assert list(f.replies) == REPLIES


def test_a_begun_sequence_is_held_no_longer_than_it_may_be():
    f = ReplyFilter(escape_delay=0.1, hold=1.0)
    assert f.feed(ESC, now=0.0) == "" and f.flush(0.05) == ""
    assert f.flush(0.1) == ESC  # the Esc key, for Textual's parser
    f = ReplyFilter(escape_delay=0.1, hold=1.0)
    assert f.feed(f"{ESC}[1;5", now=0.0) == "" and f.flush(0.5) == ""
    assert f.flush(1.0) == f"{ESC}[1;5"  # not a reply: it goes on as it came
    assert f.feed("x", now=1.1) == "x"
    f = ReplyFilter(escape_delay=0.1, hold=1.0)
    assert f.feed(f"{ESC}[?1;", now=0.0) == "" and f.flush(1.0) == ""  # a reply's beginning
    assert f.feed(f"{ESC}]11;rgb:0", now=2.0) == "" and f.flush(3.0) == ""
    assert f.feed("typed", now=3.1) == "typed"


def test_a_reply_whose_escape_came_alone_too_early():
    """Split right after its ESC, later than the Esc key's delay: the ESC has gone on as the
    Esc key by then, but the rest still never reaches the input as text."""
    f = ReplyFilter(escape_delay=0.1, hold=1.0)
    assert f.feed(ESC, now=0.0) == "" and f.flush(0.2) == ESC
    assert f.feed("[?1;2cok", now=0.5) == "ok"
    assert f.feed("[", now=0.6) == "["  # long after: text, as typed
    f = ReplyFilter(escape_delay=0.1, hold=1.0)
    assert f.feed(ESC, now=0.0) == "" and f.flush(0.2) == ESC
    assert f.feed("[x", now=0.3) == "[x"  # no reply: the text as typed


# ---- a terminal for the app -------------------------------------------------------------------

class EmulatedTerminal:
    """A program on a pseudo-terminal, its output drawn by pyte. It answers as a terminal
    does: device attributes and cursor position (pyte), the cell size and Textual's mode
    queries (here), and it ignores APC strings (Kitty graphics queries), as xterm does."""

    def __init__(self, argv: list[str], deadline: float, env: dict[str, str] | None = None):
        import pexpect
        import pyte

        class AnsweringScreen(pyte.Screen):
            def write_process_input(screen, data: str) -> None:
                self.child.send(data.encode())

        self.deadline = deadline
        self.screen = AnsweringScreen(COLUMNS, ROWS)
        self.stream = pyte.Stream(self.screen)
        self.decode = __import__("codecs").getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # output held back: an escape sequence begun in one read
        self.frames = 0  # screens read since the app's first frame
        environ = {**os.environ, "TERM": "xterm-256color", "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                               os.environ.get("PYTHONPATH")])),
                   **(env or {})}
        environ.pop("TEXTUAL", None)
        self.child = pexpect.spawn(argv[0], argv[1:], env=environ, dimensions=(ROWS, COLUMNS),
                                   cwd=str(ROOT))

    def send(self, text: str) -> None:
        self.child.send(text.encode())

    def pump(self, timeout: float = 0.1) -> bool:
        """Read what the program wrote, if anything, into the screen; False at its end."""
        import pexpect

        try:
            data = self.child.read_nonblocking(1 << 16, timeout)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False
        text = self.pending + self.decode.decode(data)
        text, self.pending = split_unfinished(text)
        begin, end = text.rfind(SYNC_BEGIN), text.rfind(SYNC_END)
        if begin > end:  # a synchronized update is drawn once it is whole, as terminals do
            text, self.pending = text[:begin], text[begin:] + self.pending
        self.answer(text)
        self.stream.feed(APC_STRING.sub("", text))
        return True

    def answer(self, output: str) -> None:
        for mode in re.findall(rf"{re.escape(ESC)}\[\?(\d+)\$p", output):
            self.send(f"{ESC}[?{mode};2$y")  # known, reset
        if f"{ESC}[16t" in output:
            self.send(f"{ESC}[6;20;10t")

    def pause(self, seconds: float) -> None:
        """Let time pass, reading (and answering) as a terminal does meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.pump(max(0.0, end - time.monotonic())):
            pass

    @property
    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, what: str, condition, timeout: float):
        """Pump until `condition(screen text)` is true; every screen of the app on the way
        must be clean of terminal replies."""
        end = min(time.monotonic() + timeout, self.deadline)
        while True:
            alive = self.pump()
            text = self.text
            if self.frames or FOOTER in text:  # the app's first frame
                self.frames += 1
                leak = LEAKS.search(text)
                assert leak is None, f"{leak[0]!r} on screen:\n{text}"
            result = condition(text)
            if result:
                return result
            assert alive, f"the app ended while waiting for {what}:\n{text}"
            assert time.monotonic() < end, f"timed out waiting for {what}; screen:\n{text}"

    def wait_for_exit(self, timeout: float) -> int:
        end = min(time.monotonic() + timeout, self.deadline)
        while self.pump():
            assert time.monotonic() < end, f"the app did not end; screen:\n{self.text}"
        self.child.close()
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


def split_unfinished(text: str) -> tuple[str, str]:
    """Output up to an escape sequence begun but not ended, and that beginning."""
    at = text.rfind(ESC)
    if at < 0 or re.match(rf"{re.escape(ESC)}(\[[0-?]*[ -/]*[@-~]|[^\[\]P_]|"
                          rf"[\]P_].*?({re.escape(ESC)}\\|\x07))", text[at:], re.S):
        return text, ""
    return text[:at], text[at:]


@pytest.fixture
def terminal_deadline():
    """The whole test's bound (each wait is bounded by it too)."""
    return time.monotonic() + 420


def composer_line(text: str) -> str:
    """The composer's first line of text (the line below its top border)."""
    lines = text.splitlines()
    tops = [i for i, line in enumerate(lines) if line.lstrip().startswith("╭")]
    return lines[tops[-1] + 1].strip(" │") if tops else ""


def sent(text: str, message: str) -> bool:
    """Whether the screen shows `message` in the conversation and the composer is empty."""
    return "You" in text and message in text and composer_line(text) == ""


# ---- the app in a real terminal -----------------------------------------------------------------

def test_typing_during_loading_in_a_real_terminal(terminal_deadline, model_270m):
    """Typed before the first frame and during loading, sent during loading: the message
    waits, goes out when the model is ready, and the reply streams. Terminal replies sent
    at every stage never reach the screen."""
    import gemma_mlx

    prompt = "The capital of France is"
    expected = gemma_mlx.Chat(model_270m, temp=0.0, max_tokens=6).send(prompt)
    argv = [sys.executable, "-m", "gemma_mlx", "chat", "--model", "270m", "--temp", "0",
            "--max-tokens", "6"]
    term = EmulatedTerminal(argv, terminal_deadline)
    try:
        # Before the first frame: Python is still importing.
        term.send(DEVICE_ATTRIBUTES + "The capital" + CURSOR_POSITION)
        term.wait_for("the first frame", lambda t: FOOTER in t, 180)
        term.wait_for("the early keys in the composer",
                      lambda t: composer_line(t) == "The capital", 60)
        # During loading.
        term.send(DEVICE_ATTRIBUTES + " of France" + CURSOR_POSITION + " is")
        term.wait_for("the keys typed during loading",
                      lambda t: composer_line(t) == prompt, 60)
        term.send(f"{DEVICE_ATTRIBUTES}\r")
        shown = term.wait_for("the message", lambda t: sent(t, prompt) and t, 60)
        if "Loading 270m" in shown:  # sent before the model was ready: shown as waiting
            assert "waiting for the model" in shown
        # While streaming (a fast machine may be done by the time the screen is read).
        term.wait_for("the reply streaming", lambda t: "replying:" in t or "first token" in t,
                      240)
        term.send(DEVICE_ATTRIBUTES + CURSOR_POSITION)
        term.wait_for("the reply", lambda t: "first token" in t, 240)
        screen = term.text
        assert "waiting for the model" not in screen and "Loading" not in screen
        reply_words = " ".join(screen.split("Gemma", 1)[1].split("╭")[0].split("█")).split()
        assert " ".join(reply_words) == " ".join(expected.split()), screen
        assert composer_line(screen) == ""
        # While composing, one reply split across reads.
        term.send("hel" + DEVICE_ATTRIBUTES[:4])
        term.pause(0.3)  # so that the app reads the two halves apart
        term.send(DEVICE_ATTRIBUTES[4:] + CURSOR_POSITION + "lo")
        term.wait_for("a new message", lambda t: composer_line(t) == "hello", 60)
        term.send("\x03")
        term.wait_for("the quit note", lambda t: "Ctrl+C again" in t, 30)
        term.send("\x03")
        assert term.wait_for_exit(60) == 0
    finally:
        term.close()


TAKE_OVER = """
import select, sys, termios, time
from tui.terminal import take_over
before = termios.tcgetattr(0)
print("START", flush=True)
select.select([0], [], [], 60)  # keys typed while the terminal is still in line mode
time.sleep(0.5)
with take_over() as terminal:
    during = termios.tcgetattr(0)
    print("TYPED", repr(terminal.typed), terminal.graphics, terminal.cell_size, flush=True)
print("ECHO", bool(during[3] & termios.ECHO), "RESTORED", termios.tcgetattr(0) == before)
"""


def test_taking_the_terminal_over_keeps_what_was_typed(terminal_deadline):
    """Keys typed in the terminal's line mode, before the app, arrive as typed (Enter as
    Enter), without the replies sent with them; our questions are answered (the cell size
    here) and the terminal is given back as it was."""
    term = EmulatedTerminal([sys.executable, "-c", TAKE_OVER], terminal_deadline)
    try:
        term.wait_for("the script", lambda t: "START" in t, 120)
        term.send(f"ab{DEVICE_ATTRIBUTES}c{CURSOR_POSITION}\r")
        assert term.wait_for_exit(60) == 0
        shown = term.text  # the whole output, once the script is done
        assert "TYPED 'abc\\r' halfcell (10, 20)" in shown, shown
        assert "ECHO False RESTORED True" in shown, shown
    finally:
        term.close()
