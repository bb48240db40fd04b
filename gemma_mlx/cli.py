"""`gemma-mlx` (`python -m gemma_mlx`): one-shot questions, and the chat, run, convert, bench and
serve subcommands; pull, list (ls), rm and ps are in model_commands.py.

Only generated text goes to stdout; notes, statistics and errors go to stderr. Every user error
is one line and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from .errors import BadRequest, GemmaError
from .hub import DEFAULT_MODEL, MODEL_NAMES
from .interrupt import Interrupt

SUBCOMMANDS = ("chat", "convert", "bench", "serve", "run", "pull", "list", "ls", "rm", "ps")
MODEL_COMMANDS = {"pull": "pull_command", "list": "list_command", "ls": "list_command",
                  "rm": "rm_command", "ps": "ps_command"}
MMPROJ_HELP = ("llama.cpp's vision projector GGUF (e.g. mmproj-model-f16.gguf) for a .gguf "
               "model: adds its vision tower, for --image")
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    try:
        if command == "convert":
            return convert_command(argv[1:])
        if command == "chat":
            return chat_command(argv[1:])
        if command == "bench":
            return bench_command(argv[1:])
        if command == "serve":
            return serve_command(argv[1:])
        if command == "run":
            return run_command(argv[1:])
        if command in MODEL_COMMANDS:
            from . import model_commands

            return getattr(model_commands, MODEL_COMMANDS[command])(argv[1:])
        with Interrupt().installed() as interrupt:  # first: Ctrl-C during imports counts too
            return oneshot_command(argv, interrupt)
    except GemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as e:  # MLX's collectives: a rank of a distributed run went away
        from .watchdog import exit_lost, lost_rank

        lost = lost_rank(e)
        if lost is None:
            raise
        exit_lost(lost, EXIT_ERROR)
        raise  # not reached
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # more Ctrl-C while exiting change nothing
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"{', '.join(MODEL_NAMES)}, a Hub repo id, a folder or a .gguf "
                             f"file (default: {DEFAULT_MODEL})")
    parser.add_argument("--mmproj", metavar="MMPROJ.gguf", default=None, help=MMPROJ_HELP)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", "-s", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="most tokens to generate (default: 1024)")
    parser.add_argument("--temp", type=float, default=1.0,
                        help="sampling temperature, 0 for greedy (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (0.95)")
    parser.add_argument("--top-k", type=int, default=64, help="top-k sampling, 0 is off (64)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="penalty above 1 discourages repeats (default: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed")


def add_memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                        help="tokens of conversation the model sees, to bound the KV cache's "
                             "memory; the oldest turns are dropped beyond it (default: the "
                             "model's window)")
    parser.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                        help="store the KV cache quantized to 8 or 4 bits (about 1/2 or 1/4 "
                             "of its memory; default: full precision)")


def add_draft_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft-model", metavar="MODEL", default=None,
                        help="speculative decoding: a small Gemma 3 (270m, 1b, a repo id, folder "
                             "or .gguf) drafts tokens that the model checks, several at a time; "
                             "the replies stay the model's own")
    parser.add_argument("--num-draft-tokens", type=int, default=None, metavar="N",
                        help="tokens drafted per step with --draft-model (default: 3)")


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distributed", choices=("tensor", "pipeline"), default=None,
                        help="run across the ranks mlx.launch started (mlx.launch --hostfile "
                             "HOSTS.json -- python -m gemma_mlx --distributed ...): tensor "
                             "splits every layer, pipeline gives each rank some layers; rank 0 "
                             "prints, the others print nothing")
    parser.add_argument("--pipeline-split", metavar="RATIOS", default=None,
                        help="with --distributed pipeline: each rank's share of the layers, "
                             "e.g. 2,1 (say, its free memory; default: even)")
    parser.add_argument("--join-timeout", type=float, default=None, metavar="SECONDS",
                        help="with --distributed: how long to wait for the other ranks to "
                             "start (default: 60)")


def distributed_options(args: argparse.Namespace) -> dict:
    """load()'s distributed options from the command line, checked before anything starts."""
    if args.distributed is None:
        for flag, value in (("--pipeline-split", args.pipeline_split),
                            ("--join-timeout", args.join_timeout)):
            if value is not None:
                raise BadRequest(f"{flag} goes with --distributed")
        return {}
    options: dict = {"distributed": args.distributed}
    if args.join_timeout is not None:
        if args.join_timeout <= 0:
            raise BadRequest(f"--join-timeout must be above 0 (got {args.join_timeout:g})")
        options["join_timeout"] = args.join_timeout
    if args.pipeline_split is not None:
        if args.distributed != "pipeline":
            raise BadRequest("--pipeline-split goes with --distributed pipeline")
        try:
            options["pipeline_split"] = [float(x) for x in args.pipeline_split.split(",")]
        except ValueError as e:
            raise BadRequest(f"--pipeline-split takes ratios like 2,1 (got "
                             f"{args.pipeline_split})") from e
    if args.draft_model is not None:
        raise BadRequest("--draft-model does not run across several machines: leave it out "
                         "with --distributed")
    return options


def start_ranks(distributed: dict):
    """This rank's group, once every rank of the run has started; from then on, a rank that
    never joins, or dies, ends this one with one line (watchdog.py)."""
    from .distributed import JOIN_TIMEOUT_S, start_group
    from .watchdog import supervise

    timeout = distributed.get("join_timeout", JOIN_TIMEOUT_S)
    supervise(timeout)
    return start_group(timeout)


def draft_options(args: argparse.Namespace) -> dict:
    """The library's draft options from the command line, checked before any loading."""
    from .speculative import check_num_draft_tokens

    if args.num_draft_tokens is None:
        return {}
    if args.draft_model is None:
        raise BadRequest("--num-draft-tokens needs --draft-model")
    check_num_draft_tokens(args.num_draft_tokens)
    return {"num_draft_tokens": args.num_draft_tokens}


def check_max_context(max_context: int | None) -> None:
    from .chat import MIN_CONTEXT

    if max_context is not None and max_context < MIN_CONTEXT:
        raise BadRequest(f"--max-context must be at least {MIN_CONTEXT} tokens "
                         f"(got {max_context})")


def sampling_from(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def add_oneshot_options(parser: argparse.ArgumentParser) -> None:
    """The one-shot answer's own options (images, raw completion, statistics)."""
    parser.add_argument("--image", "-i", action="append", default=[], metavar="PATH_OR_URL",
                        help="attach an image (repeatable); needs a vision model (4b, 12b, 27b)")
    parser.add_argument("--pan-and-scan", action="store_true",
                        help="also show the model crops of large or non-square images")
    parser.add_argument("--raw", action="store_true",
                        help="complete the prompt as plain text, without the chat template "
                             "(automatic for base models, which have none)")
    structured = parser.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", metavar="FILE_OR_JSON", default=None,
                            help="the reply is JSON matching this schema (a file, or the "
                                 "schema itself), enforced token by token")
    structured.add_argument("--json", action="store_true",
                            help="the reply is a JSON object (any keys)")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="print speed, time to first token and peak memory (and the draft's "
                             "acceptance rate) on stderr")


def oneshot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_mlx",
        description="Ask Gemma 3 one question. Subcommands: chat (the terminal app), run MODEL "
                    "[PROMPT] (an answer, or the chat app), pull, list (ls), rm (the models on "
                    "this machine), ps (what a server has loaded), convert (to an MLX folder), "
                    "bench (speed and memory), serve (an OpenAI- and Ollama-compatible server).")
    parser.add_argument("prompt", help="the prompt; '-' reads it from stdin")
    add_model_option(parser)
    add_sampling_options(parser)
    add_memory_options(parser)
    add_draft_options(parser)
    add_oneshot_options(parser)
    add_distributed_options(parser)
    return parser


def oneshot_command(argv: list[str], interrupt: Interrupt) -> int:
    return answer(oneshot_parser().parse_args(argv), interrupt)


def answer(args: argparse.Namespace, interrupt: Interrupt) -> int:
    """The one-shot answer to args.prompt, streamed to stdout. With --distributed, rank 0
    answers and the other ranks follow it (lockstep.py), printing nothing."""
    distributed = distributed_options(args)
    if not distributed:
        return answer_here(args, interrupt, {})
    from .lockstep import follow, leading

    group = start_ranks(distributed)
    if group.rank() != 0:
        from .loading import load

        follow(load(args.model, mmproj=args.mmproj, tokenizer=False, **distributed))
        return 0
    with leading(group) as leader:
        return answer_here(args, interrupt, distributed, leader)


def answer_here(args: argparse.Namespace, interrupt: Interrupt, distributed: dict,
                leader=None) -> int:
    """The answer on this machine (rank 0's, under a `leader` the other ranks follow)."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = sampling_from(args)
    if not prompt.strip():
        raise BadRequest("the prompt is empty: pass some text, or '-' to read it from stdin")
    from .chat import stream
    from .engine import SamplingSettings
    from .loading import load

    SamplingSettings(**sampling).validate()  # before the (slow) load
    check_max_context(args.max_context)
    drafting = draft_options(args)
    schema = reply_schema(args)
    model = load(args.model, mmproj=args.mmproj, **distributed)
    if leader is not None:
        leader.attach(model)
    if args.draft_model is not None:
        from .speculative import load_draft

        drafting["draft_model"] = load_draft(args.draft_model, model)
    interrupt.check()  # a Ctrl-C swallowed while loading (in a finalizer) still stops here
    raw = True if args.raw else None
    explain_raw = raw is None and not model.has_chat_template and not args.image
    chunk = None
    extra = {"images": args.image, "pan_and_scan": args.pan_and_scan} if args.image else {}
    if schema is not None:
        extra["json_schema"] = schema
    noted: set[str] = set()
    for chunk in stream(model, prompt, system=args.system, raw=raw, max_context=args.max_context,
                        kv_bits=args.kv_bits, should_stop=interrupt, **drafting, **extra,
                        **sampling):
        interrupt.streaming()
        if explain_raw:  # once the prompt is accepted: an error stays a single line
            print(f"note: {model.name} has no chat template (a base model), so the prompt is "
                  "completed as plain text, as with --raw", file=sys.stderr)
            explain_raw = False
        for notice in chunk.notices:
            if notice not in noted:
                print(f"note: {notice}", file=sys.stderr)
                noted.add(notice)
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose and chunk is not None:
        print(chunk.stats.summary(), file=sys.stderr)
    if chunk is not None and chunk.finish_reason == "cancelled":
        raise KeyboardInterrupt
    return 0


def reply_schema(args: argparse.Namespace):
    """The constraint of --json-schema (a file or the schema's JSON) or --json, checked now:
    a schema we cannot enforce is a one-line error before the model loads."""
    from pathlib import Path

    from . import constrain

    if args.json:
        return constrain.json_object()
    if args.json_schema is None:
        return None
    value = args.json_schema.strip()
    if value.startswith(("{", "[")) or value in ("true", "false"):
        return constrain.json_schema(value, "the --json-schema")
    path = Path(value).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise BadRequest(f"--json-schema {value}: no such file ({e.strerror}); give a schema "
                         "file or the schema itself, e.g. '{\"type\": \"object\"}'") from e
    return constrain.json_schema(text, f"the JSON schema in {value}")


def convert_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_mlx convert",
        description="Write an MLX model folder (the mlx-community layout) from a Hugging Face "
                    "checkpoint folder, a Hub repo or a GGUF file: into gemma-mlx's models "
                    "folder (`gemma-mlx list` shows it, `run NAME` loads it), or --out.")
    parser.add_argument("source", help="checkpoint folder, Hub repo id, alias or .gguf file")
    parser.add_argument("--name", "-n", default=None,
                        help="its name in gemma-mlx's models folder (default: the source's "
                             "name)")
    parser.add_argument("--out", "-o", default=None,
                        help="write this folder instead, outside gemma-mlx's models folder")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None,
                        help="quantization bits for unquantized checkpoints (default: 4)")
    parser.add_argument("--group-size", type=int, choices=(32, 64), default=None,
                        help="quantization group size (default: 64; 32 with --qat)")
    parser.add_argument("--qat", action=argparse.BooleanOptionalAction, default=None,
                        help="quantize with llama.cpp's Q4_0 rule (4 bits, groups of 32), the "
                             "grid Google's QAT checkpoints were trained for; the embedding stays "
                             "unquantized, as in Google's QAT GGUFs (default: for checkpoints "
                             "marked *-qat-q4_0-*, with a note; --no-qat: MLX's own rule)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="dtype of the unquantized tensors (default: as stored)")
    parser.add_argument("--no-quantize", action="store_true",
                        help="keep an unquantized checkpoint unquantized")
    parser.add_argument("--mmproj", metavar="MMPROJ.gguf", default=None,
                        help=MMPROJ_HELP.replace("for --image", "in mlx-vlm's layout"))
    args = parser.parse_args(argv)
    options = dict(bits=args.bits, group_size=args.group_size, dtype=args.dtype,
                   quantize=not args.no_quantize, mmproj=args.mmproj, qat=args.qat)
    if args.out is None:
        from .models import check_name, convert_into, default_name

        check_name(args.name or default_name(args.source))  # before the (slow) conversion
        model = convert_into(args.source, args.name, **options)
        print(f"wrote {model.path}: `gemma-mlx run {model.name}` loads it", file=sys.stderr)
        return 0
    if args.name is not None:
        raise BadRequest("--name writes into gemma-mlx's models folder and --out elsewhere: "
                         "give one of them")
    from .convert import convert

    out = convert(args.source, args.out, **options)
    print(f"wrote {out}", file=sys.stderr)
    return 0


CHAT_SAMPLING_DEFAULTS = dict(max_tokens=None, temp=None, top_p=None, top_k=None, min_p=None)


def chat_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_mlx chat",
        description="Chat with Gemma 3 in a full-screen terminal app (/help inside lists the "
                    "commands).")
    add_model_option(parser)
    add_sampling_options(parser)
    add_memory_options(parser)
    add_draft_options(parser)
    add_chat_options(parser)
    # Options not given keep the saved chat's settings (with --load) or Gemma's defaults.
    parser.set_defaults(**CHAT_SAMPLING_DEFAULTS)
    return chat(parser.parse_args(argv))


def add_chat_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", metavar="CHAT.json", help="open a chat saved with /save")
    parser.add_argument("--tools", metavar="TOOLS.json",
                        help="a JSON list of OpenAI-style function definitions the model may "
                             "call: calls show as call blocks, and your next message is their "
                             "result")
    parser.add_argument("--tool-choice", choices=("auto", "required"), default=None,
                        help="with --tools: auto (default) or required (every reply calls)")


def chat(args: argparse.Namespace) -> int:
    """The chat app on args.model."""
    from pathlib import Path

    sampling = {k: v for k, v in sampling_from(args).items() if v is not None}
    from .engine import SamplingSettings

    SamplingSettings(**sampling).validate()  # before the (slow) load
    check_max_context(args.max_context)
    drafting = draft_options(args)
    if args.draft_model is not None:
        drafting["draft_model"] = args.draft_model  # loaded (and checked) by the app
    if args.load and not Path(args.load).expanduser().is_file():
        raise BadRequest(f"no saved chat at {args.load}: check the path")
    options = chat_tools(args)
    from tui.app import run

    if args.mmproj:  # checked now, not after the app has started
        from functools import partial

        from .hub import check_mmproj
        from .loading import load

        check_mmproj(args.model, args.mmproj)
        options["loader"] = partial(load, mmproj=args.mmproj)
    return run(args.model, system=args.system, load_path=args.load,
               max_context=args.max_context, kv_bits=args.kv_bits, sampling=sampling,
               **drafting, **options)


def chat_tools(args: argparse.Namespace) -> dict:
    """--tools and --tool-choice, read and checked before anything loads."""
    import json
    from pathlib import Path

    if args.tools is None:
        if args.tool_choice is not None:
            raise BadRequest("--tool-choice needs --tools")
        return {}
    from .constrain import ReplyFormat

    try:
        tools = json.loads(Path(args.tools).expanduser().read_text())
    except OSError as e:
        raise BadRequest(f"cannot read --tools {args.tools} ({e.strerror}): check the path") from e
    except json.JSONDecodeError as e:
        raise BadRequest(f"--tools {args.tools} is not JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(tools, list):
        raise BadRequest(f"--tools {args.tools} must hold a JSON list of function definitions")
    ReplyFormat.of(tools, args.tool_choice)  # a BadRequest names what is wrong
    return {"tools": tools, "tool_choice": args.tool_choice}


def serve_command(argv: list[str]) -> int:
    import os

    parser = argparse.ArgumentParser(
        prog="python -m gemma_mlx serve",
        description="Serve models over HTTP with OpenAI's API (/v1) and Ollama's (/api): one "
                    "--model, loaded at start; several, or none (every model `gemma-mlx list` "
                    "shows), loaded on their first request and unloaded after --keep-alive.")
    parser.add_argument("--model", "-m", action="append", default=None, metavar="MODEL",
                        help=f"{', '.join(MODEL_NAMES)}, a Hub repo id, a folder, a .gguf file "
                             "or a name `gemma-mlx list` shows; repeat it to serve several "
                             "(default: every model on this machine)")
    parser.add_argument("--mmproj", metavar="MMPROJ.gguf", default=None, help=MMPROJ_HELP)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    parser.add_argument("--api-key", default=os.environ.get("GEMMA_MLX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every endpoint but "
                             "/health (default: $GEMMA_MLX_API_KEY)")
    add_memory_options(parser)
    add_draft_options(parser)
    parser.add_argument("--pan-and-scan", action="store_true",
                        help="also show the model crops of large or non-square images")
    parser.add_argument("--cors", nargs="+", default=[], metavar="ORIGIN",
                        help="allow browsers on these origins (default: CORS off)")
    parser.add_argument("--max-batch", type=int, default=None, metavar="N",
                        help="requests decoded together (continuous batching; default: as "
                             "many as fit in half the memory the weights leave, at most 16)")
    parser.add_argument("--dense-batch", action="store_true",
                        help="batches of several requests step over dense copies of the "
                             "quantized weights: more memory (a 4B: ~8 GB more), faster where "
                             "quantized matmuls of several rows are slow (NVIDIA GPUs)")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N",
                        help="requests that may wait for the model; more get 429 (default: 16)")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="let image URLs point to loopback, private and link-local "
                             "addresses (off: the server cannot be used to reach its network)")
    parser.add_argument("--cache-sessions", type=int, default=4, metavar="N",
                        help="KV caches kept between requests for prefix reuse (default: 4)")
    parser.add_argument("--cache-memory", type=float, default=8.0, metavar="GB",
                        help="most memory those caches keep (default: 8 GB)")
    parser.add_argument("--max-body-mb", type=int, default=100, metavar="MB",
                        help="largest request body (default: 100 MB)")
    parser.add_argument("--keep-alive", default="5m", metavar="DURATION",
                        help="how long a model loaded on demand stays after its last request "
                             "(30s, 5m, 1h; 0: unload at once; -1: keep; default: 5m); "
                             "Ollama's keep_alive on a request overrides it")
    parser.add_argument("--max-loaded", type=int, default=3, metavar="N",
                        help="models loaded at once; another one unloads the least recently "
                             "used idle one (default: 3)")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GB",
                        help="most memory the loaded models' weights take together (default: "
                             "3/4 of the memory)")
    parser.add_argument("--allow-pull", action="store_true",
                        help="let requests download models by alias or repo id (also "
                             "Ollama's /api/pull and /api/delete); off: they load only what "
                             "`gemma-mlx list` shows")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also log request bodies (prompts included)")
    add_distributed_options(parser)
    args = parser.parse_args(argv)
    names = args.model or []
    distributed = distributed_options(args)
    if distributed and (len(names) != 1 or args.allow_pull):
        raise BadRequest("--distributed serves one --model (every rank loads it at start)")
    if len(names) != 1:
        for flag, given in (("--mmproj", args.mmproj), ("--draft-model", args.draft_model)):
            if given:
                raise BadRequest(f"{flag} goes with one --model (the server loads it at start)")
    if names and args.allow_pull:
        raise BadRequest("--allow-pull goes without --model (a server of every model on "
                         "this machine)")
    if args.max_memory is not None and args.max_memory <= 0:
        raise BadRequest(f"--max-memory must be more than 0 GB (got {args.max_memory})")
    from .server.registry import parse_keep_alive

    keep_alive = parse_keep_alive(args.keep_alive, "--keep-alive")
    check_max_context(args.max_context)
    drafting = draft_options(args)
    for name, value in (("--port", args.port), ("--max-queue", args.max_queue),
                        ("--max-batch", args.max_batch or 1),
                        ("--cache-sessions", args.cache_sessions),
                        ("--max-body-mb", args.max_body_mb), ("--max-loaded", args.max_loaded)):
        if value < (0 if name == "--max-queue" else 1) or (name == "--port" and value > 65535):
            raise BadRequest(f"{name} is out of range (got {value})")
    from .loading import load
    from .models import locate
    from .server import serve

    model = draft = group = None
    models = []
    if distributed:
        group = start_ranks(distributed)
        if group.rank() != 0:  # it follows rank 0's requests until rank 0 stops
            from .lockstep import follow

            follow(load(names[0], mmproj=args.mmproj, tokenizer=False, **distributed))
            return 0
    if len(names) == 1:
        print(f"loading {names[0]} ...", file=sys.stderr, flush=True)
        model = load(names[0], mmproj=args.mmproj, **distributed)
        if args.draft_model is not None:
            from .speculative import load_draft

            draft = load_draft(args.draft_model, model)
    for name in names if len(names) > 1 else ():
        print(f"finding {name} ...", file=sys.stderr, flush=True)
        models.append((name, locate(name)))  # downloads now, never on a request
    max_memory = None if args.max_memory is None else int(args.max_memory * 2**30)
    serve(model, host=args.host, port=args.port, draft_model=draft, models=models, group=group,
          keep_alive=keep_alive, max_loaded=args.max_loaded, max_memory=max_memory,
          allow_pull=args.allow_pull, api_key=args.api_key,
          cors=args.cors, max_queue=args.max_queue, max_batch=args.max_batch,
          dense_batch=args.dense_batch,
          allow_private_urls=args.allow_private_urls,
          max_context=args.max_context, kv_bits=args.kv_bits, pan_and_scan=args.pan_and_scan,
          cache_sessions=args.cache_sessions, cache_bytes=int(args.cache_memory * 2**30),
          max_body_bytes=args.max_body_mb << 20, verbose=args.verbose, **drafting)
    return 0


def run_command(argv: list[str]) -> int:
    """`run MODEL [PROMPT]`: the one-shot answer with a prompt, the chat app without one (as
    `ollama run` and `docker model run`); a model not on this machine is downloaded first."""
    parser = argparse.ArgumentParser(
        prog="gemma-mlx run",
        description="Answer PROMPT with MODEL, or, without a prompt, chat with it in the "
                    "terminal app. MODEL is a name `gemma-mlx list` shows, an alias, a Hub repo "
                    "id (downloaded the first time), a folder or a .gguf file.")
    parser.add_argument("model", help=f"e.g. {', '.join(MODEL_NAMES)}")
    parser.add_argument("prompt", nargs="?", default=None,
                        help="the prompt ('-' reads it from stdin); without one, the chat app")
    parser.add_argument("--mmproj", metavar="MMPROJ.gguf", default=None, help=MMPROJ_HELP)
    add_sampling_options(parser)
    add_memory_options(parser)
    add_draft_options(parser)
    add_oneshot_options(parser)
    add_chat_options(parser)
    add_distributed_options(parser)
    parser.set_defaults(**CHAT_SAMPLING_DEFAULTS)
    args = parser.parse_args(argv)
    if args.prompt is None:
        given = [flag for flag, value in (("--image", args.image), ("--raw", args.raw),
                                          ("--verbose", args.verbose),
                                          ("--pan-and-scan", args.pan_and_scan),
                                          ("--json-schema", args.json_schema),
                                          ("--json", args.json),
                                          ("--distributed", args.distributed)) if value]
        if given:
            raise BadRequest(f"{given[0]} goes with a prompt: `gemma-mlx run {args.model} "
                             f"PROMPT {given[0]} ...` (in the chat app, /image attaches one)")
        return chat(args)
    if args.load:
        raise BadRequest("--load opens a saved chat in the chat app: leave out the prompt")
    if args.tools:
        raise BadRequest("--tools goes with the chat app: leave out the prompt")
    defaults = oneshot_parser()
    for key in CHAT_SAMPLING_DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, defaults.get_default(key))
    with Interrupt().installed() as interrupt:
        return answer(args, interrupt)


def bench_command(argv: list[str]) -> int:
    from .bench import run_bench

    return run_bench(argv, sys.stdout, sys.stderr)
