"""Constrained decoding: a grammar decides which tokens may come next, token by token, so a reply
always parses and matches its JSON schema, on any weights.

The grammars are llguidance's (JSON schema, and Lark with inline `%json` for tool calls); its
matcher computes each step's token mask over Gemma's 262k vocabulary in Rust (tens of
microseconds to a few milliseconds a step, benchmarks/RESULTS.md; xgrammar and outlines-core
were measured too and kept out). A `Constraint` is one request's matcher and state, a logits
processor the engine calls at each step (`engine.generate_tokens(constraint=...)`), so several
can run side by side (the server; later a batched decode).

The model ends a constrained reply with a stop token (<end_of_turn> or <eos>): those are allowed
exactly when the grammar accepts, and only they once it can take nothing more. JSON is written
compactly with `", "` and `": "` (as `json.dumps`): no runs of whitespace for a model to loop
on, and a call reads as the prompt shows calls.

Entry points (the library and the server):

    json_schema(schema)                    a grammar for a JSON schema (dict, JSON text or bool);
                                           BadRequest naming what cannot be enforced
    json_object()                          any JSON object (OpenAI json_object, Ollama "json")
    tool_calls(tools, choice, parallel)    Gemma tool calls (tools.py's syntax), or None for
                                           tool_choice "none"
    response_format(value) / ollama_format(value)   OpenAI's response_format and Ollama's
                                           format fields -> a grammar or None
    ReplyFormat.of(tools, tool_choice, parallel, schema)   all of a request's asks, checked;
                                           .prompted_tools for the prompt, .constraint(model)
    Constraint(model, grammar)             one request's matcher: engine.stream_tokens(...,
                                           constraint=...)
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import BadRequest
from .tools import CALL_OPENING, CALL_SEPARATOR, Tool, ToolChoice

# Compact JSON with json.dumps' separators (regexes to llguidance).
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FREE_TEXT = r"/(.|\n)*/"
_BIT_SHIFTS = mx.array(np.arange(32, dtype=np.uint32))  # bit i of a mask word: data, no graph
KEPT_MASKS = 32  # a reply's most recent distinct masks kept on the device (256 KB each)


@dataclass(frozen=True)
class Grammar:
    """A checked llguidance grammar (its serialized text) and what it constrains."""

    text: str
    kind: str  # "json_schema", "json_object" or "tool_calls"
    lazy: bool = False  # free text until a tool call opens (tool_choice "auto")


def json_schema(schema: dict | str | bool, what: str = "the JSON schema") -> Grammar:
    """The grammar of a JSON schema. A schema that llguidance cannot enforce exactly (not,
    if/then/else, uniqueItems, contains, remote $ref, lookaround patterns, unknown formats,
    ...) is refused with BadRequest naming the keyword, never loosened."""
    from llguidance import LLMatcher

    schema = _schema_value(schema, what)
    grammar = LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
    _check(grammar, what)
    return Grammar(grammar, "json_schema")


def json_object() -> Grammar:
    return Grammar(json_schema({"type": "object"}).text, "json_object")


def tool_calls(tools: Sequence[Tool], choice: ToolChoice | None = None,
               parallel: bool = True) -> Grammar | None:
    """Tool calls in tools.py's syntax, `{"name": "NAME", "parameters": ARGS}`, ARGS matching
    the tool's parameter schema, parallel calls one per line:

    - "required": the whole reply is one call (or, with `parallel`, one or more);
    - "named": the same, to that function only;
    - "auto": free text, until the text opens a call (`{"name"`); from there the rest is
      constrained as with "required" (a lazy grammar);
    - "none" (or no tools): None, no constraint."""
    from llguidance import LLMatcher

    choice = choice or ToolChoice.parse(None, tools)
    if choice.mode == "none" or not tools:
        return None
    for tool in tools:  # each tool's schema on its own, so that an error names the tool
        json_schema(tool.parameters, f"the parameters of tool {tool.name}")
    chosen = [t for t in tools if choice.mode != "named" or t.name == choice.name]
    rules = [f"fn_{i}: {_lark(json.dumps(t.name) + ', ' + json.dumps('parameters') + ': ')} "
             f"%json {json.dumps({**_schema_value(t.parameters, t.name), 'x-guidance': COMPACT})}"
             for i, t in enumerate(chosen)]
    opening = _lark(CALL_OPENING)
    more = f"({_lark(CALL_SEPARATOR)} {opening} rest)*" if parallel else ""
    if choice.mode == "auto":
        top = [f"start: TEXT | opening rest {more}", f"opening[lazy]: TEXT {opening}"]
    else:
        top = [f"start: {opening} rest {more}"]
    lark = "\n".join([
        "%llguidance {}", *top,
        f"rest: {_lark(': ')} ({' | '.join(f'fn_{i}' for i in range(len(chosen)))}) "
        f"{_lark('}')}",
        *rules, f"TEXT: {FREE_TEXT}", ""])
    grammar = LLMatcher.grammar_from_lark(lark)
    _check(grammar, "the tool definitions")
    return Grammar(grammar, "tool_calls", lazy=choice.mode == "auto")


def response_format(value: dict | None) -> Grammar | None:
    """OpenAI's `response_format`: {"type": "text"}, {"type": "json_object"} or {"type":
    "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise BadRequest("response_format json_schema needs {\"json_schema\": {\"name\": "
                             "..., \"schema\": {...}}}")
        return json_schema(spec["schema"])
    raise BadRequest(f"response_format type {kind!r} is not supported: use \"text\", "
                     "\"json_object\" or \"json_schema\"")


def ollama_format(value: str | dict | None) -> Grammar | None:
    """Ollama's `format`: "json" (any JSON object here) or a JSON schema."""
    if value in (None, ""):
        return None
    if value == "json":
        return json_object()
    if isinstance(value, dict):
        return json_schema(value)
    raise BadRequest(f"format {value!r} is not supported: use \"json\" or a JSON schema")


@dataclass(frozen=True)
class ReplyFormat:
    """What a request asks of its reply: tools in the prompt and their calls constrained, or a
    JSON schema for the whole reply. Checked when made (BadRequest), before any model runs."""

    tools: tuple[Tool, ...] = ()
    choice: ToolChoice = ToolChoice("none")
    parallel: bool = True
    grammar: Grammar | None = None

    @classmethod
    def of(cls, tools: Sequence[Any] | None = None, tool_choice: Any = None,
           parallel_tool_calls: bool = True,
           schema: dict | str | bool | Grammar | None = None) -> ReplyFormat:
        """From the library's arguments: `tools` as `tools.tools_from` takes them,
        `tool_choice` as `ToolChoice.parse`, `schema` as `json_schema` takes it (a Grammar
        as it is, e.g. `json_object()`)."""
        from .tools import tools_from

        listed = tuple(tools_from(tools))
        choice = ToolChoice.parse(tool_choice, listed)
        if schema is not None and listed and choice.mode != "none":
            raise BadRequest("give tools or a JSON schema, not both: a reply is either calls "
                             "or one JSON value")
        if isinstance(schema, Grammar):
            grammar = schema
        elif schema is not None:
            grammar = json_schema(schema)
        else:
            grammar = tool_calls(listed, choice, parallel_tool_calls)
        return cls(listed, choice, parallel_tool_calls, grammar)

    @property
    def prompted_tools(self) -> tuple[Tool, ...]:
        """The tools whose definitions go into the prompt (none with tool_choice "none")."""
        return self.tools if self.choice.mode != "none" else ()

    def follow_up(self) -> ReplyFormat:
        """The format of the reply that answers tool results: a "required" or named choice
        asked for this turn's call, and the reply after its results may answer in text."""
        if self.choice.mode not in ("required", "named"):
            return self
        auto = ToolChoice("auto")
        return ReplyFormat(self.tools, auto, self.parallel,
                           tool_calls(self.tools, auto, self.parallel))

    def constraint(self, model: Any) -> Constraint | None:
        """A fresh matcher for one reply (None when nothing is constrained)."""
        return Constraint(model, self.grammar) if self.grammar is not None else None


class Constraint:
    """One request's grammar state over one model's tokens: the engine asks `mask()` for the
    allowed tokens of the next step and `advance(token)` with the token it sampled.
    `prefetch()` starts the next mask on a worker thread (llguidance releases the GIL while it
    computes): the batch uses it so that its streams' masks are computed beside each other and
    beside the thread that reads their tokens; `seconds` adds up that mask work."""

    def __init__(self, model: Any, grammar: Grammar):
        from llguidance import LLMatcher

        self.grammar = grammar
        self.vocab = model.config.text.vocab_size
        self.stop_ids = tuple(model.config.eos_token_ids)
        self._tokenizer = llg_tokenizer(model)
        self._matcher = LLMatcher(self._tokenizer, grammar.text, log_level=0)
        if self._matcher.is_error():
            raise BadRequest(f"the constraint cannot start: {_one_line(self._matcher.get_error())}")
        self._bits = np.zeros((self.vocab + 31) // 32, dtype=np.int32)
        self._pending: Future | None = None
        self._kept: OrderedDict[bytes, mx.array] = OrderedDict()  # bitmask -> device mask
        self.seconds = 0.0
        self.steps = 0

    def prefetch(self) -> None:
        """Start computing the next mask on a worker thread; `mask()` picks it up."""
        self._settle()
        self._pending = _mask_workers().submit(self._fill)

    def mask(self) -> mx.array:
        """The allowed next tokens [vocab] (bool). Once the grammar is complete, only the stop
        tokens. A reply's masks repeat (every token inside a string allows the same set), so
        the device keeps the last KEPT_MASKS distinct ones and a repeat uploads nothing: on
        MLX's CUDA backend an array made from host memory cost ~0.4 ms a step, 7% of a 4B's
        decode on an H100 (benchmarks/constraint_levers.py). A new one goes to the device
        packed (32 KB for Gemma's vocabulary, not 256) and is unpacked there."""
        if self._pending is None:
            self._fill()
        self._settle()
        key = self._bits.tobytes()
        allowed = self._kept.get(key)
        if allowed is None:
            allowed = _unpack(mx.array(self._bits.view(np.uint32)))[:self.vocab]
            self._kept[key] = allowed
            if len(self._kept) > KEPT_MASKS:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(key)
        return allowed

    def advance(self, token: int) -> None:
        """Take the sampled token (after a stop token the grammar takes nothing more)."""
        self._settle()
        if self._matcher.is_stopped() and token in self.stop_ids:
            return
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the sampled token {token} breaks the constraint: "
                               f"{_one_line(self._matcher.get_error())}")

    @property
    def accepting(self) -> bool:
        """Whether the text so far is a whole reply of the grammar."""
        self._settle()
        return self._matcher.is_accepting()

    def reset(self) -> None:
        """Back to the start of the grammar (a new reply)."""
        self._settle()
        self._matcher.reset()

    def _fill(self) -> None:
        start = time.perf_counter()
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            raise RuntimeError(f"constraint failed: {_one_line(self._matcher.get_error())}")
        self.seconds += time.perf_counter() - start
        self.steps += 1

    def _settle(self) -> None:
        """Wait for a prefetched mask (the matcher takes one call at a time); its error, if
        any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


@mx.compile
def _unpack(words: mx.array) -> mx.array:
    """[words * 32] bool from packed uint32 words, bit i of a word its i-th token: one fused
    kernel on the device."""
    return ((words[:, None] >> _BIT_SHIFTS) & 1).reshape(-1).astype(mx.bool_)


_WORKERS: ThreadPoolExecutor | None = None


def _mask_workers() -> ThreadPoolExecutor:
    """The threads that compute prefetched masks (one per core, up to 8: a batch's streams'
    masks run side by side)."""
    global _WORKERS
    with _LOCK:
        if _WORKERS is None:
            _WORKERS = ThreadPoolExecutor(min(8, os.cpu_count() or 1),
                                          thread_name_prefix="gemma-mlx-mask")
        return _WORKERS


# ---- the tokenizer, once per model tokenizer ----------------------------------------------------

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def llg_tokenizer(model: Any) -> Any:
    """llguidance's view of the model's tokenizer (its vocabulary size, its stop tokens),
    built once per tokenizer (about 4 s for Gemma's 262k entries) and cached."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise BadRequest(f"{model.name} has no tokenizer, which constrained decoding needs: "
                         "load a model with its tokenizer files")
    import llguidance.hf

    vocab = model.config.text.vocab_size
    with _LOCK:
        built = _TOKENIZERS.setdefault(tokenizer, {})
        if vocab not in built:
            hf = getattr(tokenizer, "_tokenizer", tokenizer)
            built[vocab] = llguidance.hf.from_tokenizer(
                hf, n_vocab=vocab, eos_token=list(model.config.eos_token_ids))
        return built[vocab]


# ---- helpers -------------------------------------------------------------------------------------

def _schema_value(schema: dict | str | bool, what: str) -> dict | bool:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise BadRequest(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column "
                             f"{e.colno})") from e
    if not isinstance(schema, (dict, bool)):
        raise BadRequest(f"{what} must be a JSON object (got {type(schema).__name__})")
    return schema


def _check(grammar: str, what: str) -> None:
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise BadRequest(f"{what} cannot be enforced: {_one_line(error)}; remove or rewrite "
                         "that part")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split("<state>")[0].split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _lark(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text)
