"""A small process beside each rank of a distributed run that ends the rank when it would hang.

MLX cannot do it from inside: its start blocks, holding Python's lock, until every rank has
connected; and when a rank dies, its ring backend fails the collectives then in flight but
waits for ever in the ones queued after them (the rest of a forward pass). So a watchdog
process ends this one with one clear line:
- when the group has not formed within the join timeout (`Watchdog.joined` was not called);
- when the ring reports a lost peer on stderr and this process is still there `GRACE_S`
  seconds later (an error it raised itself and printed is enough: no second line then).

`Watchdog.start(..., take_stderr=True)` (the CLI's, or `supervise()` for a script) reads this
process's stderr through a pipe, which it also needs to see the ring's reports; it passes
everything on but the ring's lost-socket lines (all of them with MLX_RING_VERBOSE=1). Without
it, only the join is watched.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys

from .errors import RankUnavailable

GRACE_S = 3.0  # after the ring lost a peer, how long this rank may take to stop by itself
JOINED = "\x1egemma-mlx: the group has formed\x1e"  # tells the watchdog so, as a line

JOIN_MESSAGE = ("error: the other ranks did not join within {timeout:g} s: start the same "
                "command on every host (mlx.launch --hostfile HOSTS.json -- python -m "
                "gemma_mlx ...), and check that each host reaches the addresses in the hostfile")
LOST_MESSAGE = ("error: a rank stopped or cannot be reached (the ring lost its connection): "
                "see that rank's own error; every rank stops")

_PROGRAM = r"""
import os, select, signal, sys, time
parent, timeout, grace = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
verbose = sys.argv[4] == "1"
join_message, lost_message, joined = sys.argv[5], sys.argv[6], sys.argv[7].encode()
LOST = (b"closed by the peer", b"failed with errno", b"Too many send/recv errors",
        b"connection to a peer was lost")
deadline, message, said, held = time.monotonic() + timeout, join_message, False, b""

def end(message):
    if message and not said:
        os.write(2, (message + "\n").encode())
    try:
        os.kill(parent, signal.SIGTERM)
        for _ in range(20):
            time.sleep(0.1)
            os.kill(parent, 0)
        os.kill(parent, signal.SIGKILL)
    except ProcessLookupError:
        pass
    sys.exit(0)

while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not select.select([0], [], [], wait)[0]:
        end(message)
    data = os.read(0, 65536)
    if not data:
        break
    *lines, held = (held + data).split(b"\n")
    if held and not held.startswith((b"[", b"\x1e")):  # a partial line (a progress bar): now
        lines.append(held)
        held = b""
        partial = True
    else:
        partial = False
    for i, line in enumerate(lines):
        last = partial and i == len(lines) - 1
        if joined in line:
            deadline, line = None, line.replace(joined, b"")
            if not line:
                continue
        if line.startswith(b"[ring]") and any(s in line for s in LOST):
            if deadline is None or message != lost_message:
                deadline, message = time.monotonic() + grace, lost_message
            if not verbose:
                continue
        said = said or line.startswith(b"error:")
        os.write(2, line if last else line + b"\n")
"""


class Watchdog:
    """The watchdog process of this rank (at most one per process)."""

    current: Watchdog | None = None

    def __init__(self, process: subprocess.Popen, pipe: int | None, stderr: int | None):
        self.process = process
        self._pipe = pipe  # the write end, when stderr does not already go there
        self._stderr = stderr  # the real stderr, while the watchdog reads ours

    @classmethod
    def start(cls, join_timeout: float, take_stderr: bool = False) -> Watchdog:
        """Start watching: the group must form within `join_timeout` seconds. With
        `take_stderr`, this process's stderr goes through the watchdog from now on."""
        if cls.current is not None:
            return cls.current
        read, write = os.pipe()
        verbose = "1" if os.environ.get("MLX_RING_VERBOSE") else "0"
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PROGRAM, str(os.getpid()), str(join_timeout),
             str(GRACE_S), verbose, JOIN_MESSAGE.format(timeout=join_timeout), LOST_MESSAGE,
             JOINED], stdin=read)
        os.close(read)
        stderr = None
        if take_stderr:
            sys.stderr.flush()
            stderr = os.dup(2)
            os.dup2(write, 2)
            os.close(write)
            write = None
            atexit.register(cls.release)
        cls.current = cls(process, write, stderr)
        return cls.current

    def joined(self) -> None:
        """The group has formed: no more join deadline. A watchdog that does not read stderr
        has nothing left to do and ends."""
        line = (JOINED + "\n").encode()
        if self._pipe is None:
            sys.stderr.flush()
            os.write(2, line)
            return
        os.write(self._pipe, line)
        os.close(self._pipe)
        self._pipe = None
        self.process.wait()
        Watchdog.current = None

    @classmethod
    def release(cls) -> None:
        """Give stderr back and let the watchdog pass on what it holds before this process
        ends (so that the last lines come before the shell's prompt)."""
        watchdog = cls.current
        if watchdog is None or watchdog._stderr is None:
            return
        sys.stderr.flush()
        os.dup2(watchdog._stderr, 2)
        os.close(watchdog._stderr)
        watchdog._stderr = None
        try:
            watchdog.process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            watchdog.process.kill()
        cls.current = None


def supervise(join_timeout: float) -> Watchdog:
    """For a script run on every rank (`load(..., distributed=...)`): call it first, so that a
    rank that never joins, or one that dies, ends the others with one line instead of a hang
    (an uncaught lost-rank error too: `exit_lost`)."""
    watchdog = Watchdog.start(join_timeout, take_stderr=True)
    default = sys.excepthook

    def hook(kind: type, error: BaseException, trace: object) -> None:
        lost = lost_rank(error)
        if lost is None:
            default(kind, error, trace)
        else:
            exit_lost(lost)

    sys.excepthook = hook
    return watchdog


def lost_rank(error: BaseException) -> RankUnavailable | None:
    """A RankUnavailable for a failure of the collectives (a rank died or its host went away),
    None for any other error. MLX raises them as RuntimeErrors named by backend."""
    text = str(error)
    if not isinstance(error, RuntimeError) or not text.startswith(
            ("[ring]", "[jaccl]", "[nccl]", "[mpi]", "[distributed]")):
        return None
    if "send" in text.lower() and "not supported" in text.lower():
        return RankUnavailable(f"this backend cannot pass hidden states from rank to rank "
                               f"({text}): run --distributed pipeline on the ring backend "
                               "(mlx.launch --backend ring), or use --distributed tensor")
    return RankUnavailable(f"a rank stopped or cannot be reached ({text}): see that rank's "
                           "own error; every rank stops")


def exit_lost(error: RankUnavailable, code: int = 1) -> None:
    """Say so in one line and end this process now: MLX's streams stay blocked on the lost
    rank, so an ordinary exit would hang."""
    print(f"error: {error}", file=sys.stderr)
    sys.stdout.flush()
    Watchdog.release()
    os._exit(code)
