"""Which grammar engine computes Gemma's token masks fastest: llguidance, xgrammar, outlines-core.

    python benchmarks/grammar_engines.py [--tokens 96] [--repeats 3] [--json OUT]

Gemma 3 has a 262,144-entry vocabulary, so a token mask is 8192 32-bit words and the work per
step is a walk over a 262k-token trie. Each engine gets the same JSON schemas (compact JSON,
", " and ": " separators, as our constraint uses) and the same tokens: a schema-valid JSON text
tokenized by Gemma's tokenizer. Per step, each engine fills the next mask into a numpy bitmask
and then consumes the token, timed together (`mask_ms`: median, p90 and max over the steps);
`compile_s` is the grammar build for the schema, `tokenizer_s` the one-off tokenizer set-up.

The engines other than llguidance are optional (neither is a dependency): install them by hand
to compare, e.g. `pip install xgrammar outlines-core`. xgrammar's Python package imports torch
for its tensor helpers only; without torch, `--stub-torch` imports it against a tiny stand-in
module and hands it numpy bitmasks, which it takes through DLPack (its CPU path is unchanged).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 262_144
END_OF_TURN, EOS = 106, 1
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# (name, schema, a valid instance): a tool call, nested records, free text, any object.
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
CASES: list[tuple[str, dict, Any]] = [
    ("tool call", {"type": "object", "properties": {
        "name": {"const": "get_weather"}, "parameters": WEATHER},
        "required": ["name", "parameters"], "additionalProperties": False},
     {"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius", "days": 3}}),
    ("nested records", {"type": "object", "properties": {
        "people": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {
                "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["name", "age", "tags"], "additionalProperties": False}}},
        "required": ["people"], "additionalProperties": False},
     {"people": [{"name": "Ada Lovelace", "age": 36, "tags": ["maths", "engines"]},
                 {"name": "Alan Turing", "age": 41, "tags": ["computing"]}]}),
    ("long string", {"type": "object", "properties": {"summary": {"type": "string"}},
                     "required": ["summary"], "additionalProperties": False},
     {"summary": "The quick brown fox jumps over the lazy dog, then naps in the warm "
                 "afternoon sun beside the old stone wall while the farmer counts his sheep "
                 "and the church bell rings twelve times across the quiet valley."}),
    ("any object", {"type": "object"},
     {"title": "Report", "count": 12, "ok": True, "items": [1.5, "two", None]}),
]


def tokens_of(tokenizer: Any, value: Any, limit: int) -> list[int]:
    text = json.dumps(value, ensure_ascii=False)
    return tokenizer.encode(text, add_special_tokens=False)[:limit]


# ---- the engines: each returns (setup seconds, a factory of per-schema steppers) -------------

Stepper = Callable[[np.ndarray, int | None], None]  # fill the mask, then consume the token


def llguidance_engine(hf: Any) -> tuple[float, Callable[[dict], Callable[[], Stepper]]]:
    import llguidance.hf
    from llguidance import LLMatcher

    start = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=VOCAB, eos_token=[END_OF_TURN, EOS])
    setup = time.perf_counter() - start

    def compile_schema(schema: dict) -> Callable[[], Stepper]:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
        error = LLMatcher.validate_grammar(grammar, tok)
        assert not error, error

        def start_matcher() -> Stepper:
            matcher = LLMatcher(tok, grammar)
            assert not matcher.is_error(), matcher.get_error()

            def step(mask: np.ndarray, token: int | None) -> None:
                matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
                if token is not None:
                    assert matcher.consume_token(token), matcher.get_error()
            return step
        return start_matcher
    return setup, compile_schema


def xgrammar_engine(hf: Any) -> tuple[float, Callable[[dict], Callable[[], Stepper]]]:
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB,
                                              stop_token_ids=[END_OF_TURN, EOS])
    compiler = xgr.GrammarCompiler(info)
    setup = time.perf_counter() - start

    def compile_schema(schema: dict) -> Callable[[], Stepper]:
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                separators=(", ", ": "), strict_mode=True)

        def start_matcher() -> Stepper:
            matcher = xgr.GrammarMatcher(compiled)

            def step(mask: np.ndarray, token: int | None) -> None:
                matcher.fill_next_token_bitmask(mask[None], 0)
                if token is not None:
                    assert matcher.accept_token(token)
            return step
        return start_matcher
    return setup, compile_schema


def outlines_core_engine(hf: Any) -> tuple[float, Callable[[dict], Callable[[], Stepper]]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    pieces: dict[bytes, list[int]] = {}
    for i in range(VOCAB):
        if i in (END_OF_TURN, EOS):
            continue
        piece = hf.convert_ids_to_tokens(i)
        if piece.startswith("<0x") and len(piece) == 6:
            raw = bytes([int(piece[3:5], 16)])
        elif piece.startswith("<") and piece.endswith(">") and i < 256:
            continue  # control tokens: never inside JSON
        else:
            raw = piece.replace("\u2581", " ").encode()
        pieces.setdefault(raw, []).append(i)
    vocabulary = Vocabulary(END_OF_TURN, pieces)
    setup = time.perf_counter() - start

    def compile_schema(schema: dict) -> Callable[[], Stepper]:
        # Its separators are fixed: an optional space around "," and ":" takes ours.
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern="[ ]?")
        index = Index(regex, vocabulary)

        def start_matcher() -> Stepper:
            guide = Guide(index)

            def step(mask: np.ndarray, token: int | None) -> None:
                guide.write_mask_into(mask.ctypes.data, mask.size, 4)
                if token is not None:
                    guide.advance(token, return_tokens=False)
            return step
        return start_matcher
    return setup, compile_schema


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine,
           "outlines-core": outlines_core_engine}


def stub_torch() -> None:
    """Let xgrammar import without torch (see the module docstring): tvm-ffi is imported first,
    while torch is still missing, so that it takes the no-torch path; then a stand-in module
    provides the few names xgrammar's own modules touch at import."""
    import tvm_ffi  # noqa: F401

    folder = Path(tempfile.mkdtemp()) / "torch"
    folder.mkdir()
    (folder / "__init__.py").write_text(
        "import numpy as _np\nint32 = _np.int32\n"
        "def tensor(x, dtype=None): return _np.array(x, dtype=dtype)\n"
        "def full(shape, v, dtype=None): return _np.full(shape, int(v), dtype=dtype)\n"
        "class cuda:\n    @staticmethod\n    def is_available(): return False\n"
        "def __getattr__(name):\n"
        "    if name[:1].isupper(): return type(name, (), {})\n"
        "    raise AttributeError(name)\n")
    sys.path.insert(0, str(folder.parent))


def measure(engine: str, hf: Any, n_tokens: int, repeats: int) -> dict:
    setup, compile_schema = ENGINES[engine](hf)
    cases = []
    for name, schema, value in CASES:
        tokens = tokens_of(hf, value, n_tokens)
        try:
            start = time.perf_counter()
            start_matcher = compile_schema(schema)
            compile_s = time.perf_counter() - start
        except Exception as e:  # an engine that cannot take this schema: say so, go on
            cases.append({"case": name, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        mask = np.zeros(VOCAB // 32, dtype=np.int32)
        times: list[float] = []
        for _ in range(repeats):
            step = start_matcher()
            for token in tokens:
                t = time.perf_counter()
                step(mask, token)
                times.append(time.perf_counter() - t)
        times.sort()
        cases.append({"case": name, "tokens": len(tokens), "compile_s": compile_s,
                      "mask_ms": {"median": 1e3 * statistics.median(times),
                                  "p90": 1e3 * times[int(0.9 * (len(times) - 1))],
                                  "max": 1e3 * times[-1]}})
    return {"engine": engine, "tokenizer_s": setup, "cases": cases}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=96, help="most tokens per case (96)")
    p.add_argument("--repeats", type=int, default=3, help="passes over each case (3)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    p.add_argument("--stub-torch", action="store_true", help="xgrammar without torch")
    p.add_argument("--json", metavar="OUT", help="also write the report here")
    args = p.parse_args(argv)
    if args.stub_torch:
        stub_torch()
    from transformers import AutoTokenizer

    import gemma_mlx.hub

    hf = AutoTokenizer.from_pretrained(gemma_mlx.hub.resolve("270m"))
    report = {"vocab": VOCAB, "engines": []}
    for engine in args.engines.split(","):
        try:
            result = measure(engine, hf, args.tokens, args.repeats)
        except ImportError as e:
            result = {"engine": engine, "error": f"not installed ({e})"}
        report["engines"].append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
