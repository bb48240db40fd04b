"""Slash commands: the one table that the composer, its completion list, the command palette
and /help share; parsing a typed command; completing command names, settings and paths.

Nothing here knows Textual or the model: the app runs the commands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
CHAT_SUFFIXES = frozenset({".json"})
MAX_COMPLETIONS = 50


@dataclass(frozen=True)
class SlashCommand:
    name: str
    usage: str  # the arguments, as /help shows them ("" for none)
    summary: str
    needs_argument: bool = False  # the palette puts it in the composer instead of running it
    while_busy: bool = False  # allowed while a reply streams (it leaves the conversation alone)

    @property
    def title(self) -> str:
        return f"/{self.name} {self.usage}".rstrip()


COMMANDS: tuple[SlashCommand, ...] = (
    SlashCommand("help", "", "commands and keys", while_busy=True),
    SlashCommand("image", "PATH", "attach an image to the next message (/image - drops them)",
                 needs_argument=True, while_busy=True),
    SlashCommand("clear", "", "start the conversation afresh"),
    SlashCommand("system", "[TEXT | -]", "show the system prompt, set it, or (-) remove it"),
    SlashCommand("retry", "", "generate the last reply again"),
    SlashCommand("undo", "", "take back the last exchange; its message returns to the composer"),
    SlashCommand("save", "[PATH]", "save the conversation (JSON, images embedded)"),
    SlashCommand("load", "PATH", "open a saved conversation", needs_argument=True),
    SlashCommand("set", "temp|top_p|top_k|max_tokens VALUE", "change a sampling setting",
                 needs_argument=True),
    SlashCommand("stats", "", "speed, context and memory of the last reply", while_busy=True),
    SlashCommand("copy", "", "copy the last reply to the clipboard", while_busy=True),
    SlashCommand("quit", "", "leave (also Ctrl+C twice)", while_busy=True),
)
BY_NAME = {command.name: command for command in COMMANDS}

# What /set may change, and how its value is read.
SETTINGS: dict[str, type] = {"temp": float, "top_p": float, "top_k": int, "max_tokens": int}


@dataclass(frozen=True)
class Typed:
    """A line typed after a slash: the command (None if unknown), its name and argument."""

    command: SlashCommand | None
    name: str
    argument: str


def parse(text: str) -> Typed:
    name, _, argument = text.strip()[1:].partition(" ")
    name = name.lower()
    return Typed(BY_NAME.get(name), name, argument.strip())


@dataclass(frozen=True)
class Completion:
    value: str  # the composer's whole text once this is chosen
    label: str  # what the completion list shows
    help: str = ""


def complete(text: str) -> list[Completion]:
    """What Tab may turn `text` into: command names, then each command's argument."""
    if not text.startswith("/") or "\n" in text:
        return []
    name, space, argument = text[1:].partition(" ")
    if not space:
        return [Completion(f"/{c.name}" + (" " if c.usage else ""), c.title, c.summary)
                for c in COMMANDS if c.name.startswith(name.lower())]
    if name == "image":
        return complete_path("/image ", argument, IMAGE_SUFFIXES)
    if name in ("load", "save"):
        return complete_path(f"/{name} ", argument, CHAT_SUFFIXES)
    if name == "set" and " " not in argument:
        return [Completion(f"/set {s} ", s) for s in SETTINGS if s.startswith(argument)]
    return []


def complete_path(prefix: str, typed: str, suffixes: frozenset[str]) -> list[Completion]:
    """Folders and files with one of `suffixes` that start with what was typed."""
    path = Path(typed).expanduser()
    if typed == "" or typed.endswith(("/", os.sep)):
        folder, stem = (path if typed else Path(".")), ""
    else:
        folder, stem = path.parent, path.name
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name.lower())
    except OSError:  # no such folder (yet) or not readable: nothing to offer
        return []
    head = typed[:len(typed) - len(stem)]
    found = []
    for entry in entries:
        if not entry.name.startswith(stem) or (entry.name.startswith(".")
                                                and not stem.startswith(".")):
            continue
        is_folder = entry.is_dir()
        if not is_folder and entry.suffix.lower() not in suffixes:
            continue
        shown = entry.name + ("/" if is_folder else "")
        found.append(Completion(prefix + head + shown, shown))
        if len(found) == MAX_COMPLETIONS:
            break
    return found


def next_completion(text: str, candidates: list[Completion]) -> str | None:
    """Tab, as in a shell: the only candidate, else the longest common prefix, else cycle."""
    values = [c.value for c in candidates]
    if not values:
        return None
    if text in values:
        return values[(values.index(text) + 1) % len(values)]
    if len(values) == 1:
        return values[0]
    common = os.path.commonprefix(values)
    return common if len(common) > len(text) else values[0]


def image_path_in(text: str) -> Path | None:
    """The image file that a paste (or a dropped file) names, if the text is just that:
    a path, maybe quoted, shell-escaped or a file:// URL."""
    text = text.strip()
    if not text or "\n" in text or len(text) > 4096:
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if text.startswith("file://"):
        text = unquote(urlparse(text).path)
    text = text.replace("\\ ", " ")
    path = Path(text).expanduser()
    try:
        is_image = path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    except OSError:  # a name too long or otherwise unusable as a path
        return None
    return path if is_image else None
