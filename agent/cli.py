"""The ``omnivox`` command line: one table maps each command to its function.

User errors (bad files, bad arguments, bad checkpoints) print one line and exit with
status 2; no traceback. ``OMNIVOX_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from omnivox.convert.cli import (
    add_convert_salmonn_arguments,
    add_convert_whisper_arguments,
    run_convert_salmonn,
    run_convert_whisper,
)
from omnivox.errors import OmnivoxError, UserInputError

log = logging.getLogger("omnivox")

DTYPES = ("float32", "float16", "bfloat16")


def default_model_dir() -> Path:
    """The bundled nano model (``assets/nano`` beside the package), or $OMNIVOX_MODEL."""
    env = os.environ.get("OMNIVOX_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "assets" / "nano"


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def model_folder(args: argparse.Namespace) -> Path:
    """``--model``, or the bundled default."""
    return Path(args.model) if args.model else default_model_dir()


def load_model_for_cli(args: argparse.Namespace, transcriber: bool = True):
    """Load ``--model`` (or the bundled default) with the device/dtype/quantization flags, as an
    :class:`~omnivox.agent.assistant.Assistant` (``transcriber=False``: without the folder's
    Whisper transcriber)."""
    import torch

    from omnivox.agent.assistant import Assistant

    folder = model_folder(args)
    if not (folder / "config.json").is_file():
        hint = "" if args.model else " (no --model given and no bundled model found; pass --model DIR)"
        raise UserInputError(f"{folder}: not an omnivox model folder{hint}")
    if args.load_in_8bit and args.load_in_4bit:
        raise UserInputError("choose one of --load-in-8bit and --load-in-4bit")
    quant = "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {args.device}: CUDA is not available on this machine")
    with _stderr_console().status(f"Loading model from {folder} ..."):
        return Assistant.from_pretrained(
            folder,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            quantization=quant,
            lora_scale=args.lora_scale,
            transcriber=transcriber,
        )


def generation_overrides(args: argparse.Namespace) -> dict:
    """The decoding flags given, checked (so that bad values fail before a big model loads).

    The model's default decoding (``config.generation.override(**overrides)``) applies under them.
    """
    from omnivox.agent.generation import GenerationSettings

    if args.greedy and args.temperature is not None:
        raise UserInputError("--greedy and --temperature exclude each other")
    overrides: dict = {}
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.greedy:
        overrides.update(num_beams=1, do_sample=False)
    elif args.temperature is not None:
        overrides.update(num_beams=1, do_sample=True, temperature=args.temperature)
    elif args.num_beams is not None:
        overrides.update(num_beams=args.num_beams, do_sample=False)
    if args.ctc_fusion_weight is not None:
        overrides["ctc_fusion_weight"] = args.ctc_fusion_weight
    if args.no_transcriber:
        overrides["use_transcriber"] = False
    GenerationSettings(**overrides)  # raises UserInputError naming the bad value
    return overrides


def _audio_out_path(path: str | None) -> Path | None:
    """``--out``, checked before a model loads: a .wav file in an existing folder."""
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() != ".wav":
        raise UserInputError(f"--out {path}: audio is written as WAV; give a path ending in .wav")
    if not out.parent.is_dir():
        raise UserInputError(f"--out {path}: the folder {out.parent} does not exist")
    return out


def load_speech_for_cli(args: argparse.Namespace):
    """The speech head of ``--model`` (or the bundled default) alone: text to speech needs no LLM."""
    import torch

    from omnivox.decoders.speech import SpeechHead

    folder = model_folder(args)
    if not (folder / "config.json").is_file():
        raise UserInputError(f"{folder}: not an omnivox model folder")
    if not SpeechHead.present(folder):
        raise UserInputError(f"{folder}: this model folder cannot speak: it has no talker/ (see the README, 'Audio out')")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {args.device}: CUDA is not available on this machine")
    with _stderr_console().status(f"Loading the speech head from {folder} ..."):
        return SpeechHead.from_folder(folder, args.device, getattr(torch, args.dtype))


def audio_to_file(out: Path, sample_rate: int, make):
    """``make(on_audio)`` (a speech head's ``say`` or ``transform``) writing into ``out`` (WAV, piece
    by piece while the audio is made; removed again if making it fails); returns what ``make`` does."""
    from omnivox.agent.workspace import WavWriter

    try:
        with WavWriter(out, sample_rate) as writer:
            return make(writer.write)
    except BaseException:
        out.unlink(missing_ok=True)  # no half-written answer left behind
        raise


def speak_to_file(head, text: str, out: Path, voice: str | None = None, **options):
    """Speak ``text`` with the speech head ``head`` into ``out``; returns the
    :class:`~omnivox.decoders.speech.SpokenAudio`."""
    return audio_to_file(out, head.sample_rate, lambda on_audio: head.say(text, voice, on_audio=on_audio, **options))


def _report_audio(spoken, out: Path) -> None:
    first = f", first audio after {1000 * spoken.first_audio_s:.0f} ms" if spoken.first_audio_s is not None else ""
    voice = f", voice {spoken.voice}" if spoken.voice else ""
    print(f"wrote {out} ({spoken.seconds:.2f} s of audio{voice}{first})", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    from omnivox.agent.audio import load_audio
    from omnivox.agent.chat import ChatSession
    from omnivox.decoders.speech import AUDIO_TASKS

    overrides = generation_overrides(args)  # flags and audio are checked before loading a big model
    out = _audio_out_path(args.out)
    clips = [load_audio(path) for path in args.audio]
    assistant = load_model_for_cli(args, transcriber=not args.no_transcriber)
    if out is not None:
        assistant.speech.voice_id(args.voice)  # a folder that cannot speak, or an unknown voice: say so now
    settings = assistant.settings(**overrides)
    session = ChatSession(assistant, settings)
    for clip in clips:
        session.add_audio(clip.samples)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream = show if settings.num_beams == 1 else None
    if args.prompt and out is not None and clips and set(assistant.speech_tasks).intersection(AUDIO_TASKS):
        return _chat_audio_answer(assistant, " ".join(args.prompt), [c.samples for c in clips], settings, out, args.voice)
    if args.prompt:
        answer = session.ask_generation(" ".join(args.prompt), on_text=stream)
        print(answer.text if stream is None else "")
        if out is not None:
            if answer.tool_calls or not answer.text.strip():
                raise UserInputError("the answer has no text to speak; nothing written")
            _report_audio(speak_to_file(assistant.speech, answer.text, out, args.voice), out)
        return 0
    if out is not None:
        raise UserInputError("--out needs a prompt (an interactive chat is not written to a file)")
    print("omnivox chat: type a question; /audio FILE adds a clip, /reset forgets, /quit ends.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            continue
        try:
            if line.startswith("/audio "):
                session.add_audio(load_audio(line.split(maxsplit=1)[1]).samples)
                continue
            sys.stdout.write("omnivox> ")
            answer = session.ask(line, on_text=stream)
            print(answer if stream is None else "")
        except UserInputError as err:
            print(f"omnivox: error: {err}", file=sys.stderr)


def _chat_audio_answer(assistant, request: str, clips: list, settings, out: Path, voice: str | None) -> int:
    """``chat --out`` about clips with a speech head that does tasks on audio: the model may answer
    with one (``agent_loop.audio_answer``); its audio is written, or else the text answer is spoken."""
    from omnivox.agent.agent_loop import audio_answer
    from omnivox.agent.workspace import WavWriter

    result, made = audio_answer(assistant, request, clips, settings)
    for step in result.steps:
        if step.kind == "call":
            print(step.line(), file=sys.stderr)
    print(result.answer)
    if made is None:
        if not result.answer.strip():
            raise UserInputError("the answer has no text to speak; nothing written")
        _report_audio(speak_to_file(assistant.speech, result.answer, out, voice), out)
        return 0
    with WavWriter(out, made.sample_rate) as writer:
        writer.write(made.samples)
    print(f"wrote {out} ({made.duration:.2f} s of audio: {made.note})", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from omnivox.agent.audio import load_audio
    from omnivox.decoders.speech import NEEDS_PROMPT, TASKS

    out = _audio_out_path(args.out)
    text = " ".join(args.text).strip()
    if args.task == "tts" and not text:
        raise UserInputError("--task tts needs the text to speak")
    if args.task != "tts" and (text or not args.audio):
        raise UserInputError(f"--task {args.task} ({TASKS[args.task]}) takes an input clip (--audio FILE), not text")
    if args.task in NEEDS_PROMPT and not args.prompt_audio:
        raise UserInputError(f"--task {args.task} needs --prompt-audio FILE: a clip of the voice to keep")
    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        raise UserInputError(f"--plot {args.plot}: give a path ending in .png")
    source = load_audio(args.audio) if args.audio else None
    prompt = load_audio(args.prompt_audio) if args.prompt_audio else None
    head = load_speech_for_cli(args)
    options = {"temperature": args.temperature, "seed": args.seed}
    if args.task == "tts":
        result = speak_to_file(head, text, out, args.voice, speed=args.speed, **options)
        print(text, flush=True)
    else:
        enrol = None if prompt is None else prompt.samples
        result = audio_to_file(out, head.sample_rate, lambda on_audio: head.transform(
            source.samples, args.task, enrol, on_audio=on_audio, **options))  # fmt: skip
    _report_audio(result, out)
    if args.plot:
        from omnivox.evaluation.report import plot_spectrograms

        column = [] if source is None else [(f"input {Path(args.audio).name}", source.samples, 16_000)]
        column.append((f"{args.task}: {result.voice or 'output'}", result.waveform, result.sample_rate))
        print(f"wrote {plot_spectrograms([column], Path(args.plot))}", file=sys.stderr)
    return 0


def add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    """``omnivox generate``'s flags; its tasks are the speech head's (``decoders.speech.TASKS``)."""
    from omnivox.decoders.speech import TASKS

    gen.add_argument("--model", help="omnivox model folder with a talker/ (default: the bundled nano model)")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    gen.add_argument("--dtype", default="float32", choices=DTYPES, help="the talker's dtype (the codec decodes in float32)")
    gen.add_argument("--task", required=True, choices=tuple(TASKS),
                     help="; ".join(f"{name}: {what}" for name, what in TASKS.items())
                          + " (from --audio, the voice of --prompt-audio for tse; what the model's talker was trained for)")  # fmt: skip
    gen.add_argument("--audio", default=None, metavar="FILE", help="the input clip (every task but tts)")
    gen.add_argument("--prompt-audio", default=None, metavar="FILE", help="a clip of the voice to keep (tse)")
    gen.add_argument("--out", required=True, metavar="FILE.wav", help="where the audio is written (WAV)")
    gen.add_argument("--voice", default=None, help="voice name (default: the model's; see its talker/talker.json)")
    gen.add_argument("--speed", type=float, default=1.0, help="pace, 0.25-4 (default 1: the voice's own)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: the likeliest codes (default); above: sample")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the spectrograms (input above output) here")
    gen.add_argument("text", nargs="*", help="the text (tts)")


def cmd_serve(args: argparse.Namespace) -> int:
    from omnivox.agent.server import ServerLimits, serve

    if not 0 < args.port < 65536:
        raise UserInputError(f"--port must be from 1 to 65535, got {args.port}")
    limits = ServerLimits(
        max_batch_size=args.max_batch_size,
        batch_window_ms=args.batch_window_ms,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        max_audio_seconds=args.max_audio_seconds,
        max_tokens=args.max_tokens,
    )
    assistant = load_model_for_cli(args)
    serve(assistant, model_folder(args).resolve().name, host=args.host, port=args.port, api_key=args.api_key,
          limits=limits)  # fmt: skip
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from omnivox.agent.agent_loop import Agent
    from omnivox.agent.audio import load_audio
    from omnivox.agent.builtin_tools import builtin_tools
    from omnivox.agent.workspace import Workspace

    if args.max_steps < 1 or not args.max_seconds > 0:
        raise UserInputError(f"--max-steps must be >= 1 and --max-seconds > 0, got {args.max_steps} and {args.max_seconds}")
    clips = [load_audio(path).samples for path in args.audio]  # the user's own files, checked before loading
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    assistant = load_model_for_cli(args)
    workspace = Workspace(out_dir)
    registry = builtin_tools(assistant, workspace)
    if args.tools:
        from omnivox.agent.tools import ToolRegistry

        registry = ToolRegistry(registry.select([n.strip() for n in args.tools.split(",") if n.strip()]))
    agent = Agent(assistant, registry, workspace, max_steps=args.max_steps, max_seconds=args.max_seconds,
                  raise_on_tool_error=args.raise_tool_errors)  # fmt: skip

    def show(step) -> None:  # the trace as it happens, on stderr; the answer alone on stdout
        if not args.json and step.kind == "call":
            print(step.line(), file=sys.stderr)

    result = agent.run(" ".join(args.goal), clips, on_step=show)
    if args.json:
        print(result.trace_json())
    else:
        print(result.answer)
        for artifact, path in result.artifacts.items():
            print(f"{artifact}: {path}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from omnivox.agent.export import export_model_folder

    generation = None
    if args.generation is not None:
        try:
            generation = json.loads(args.generation)
        except json.JSONDecodeError as err:
            raise UserInputError(f"--generation: not JSON ({err})") from None
        if not isinstance(generation, dict):
            raise UserInputError(f"--generation: expected a JSON object, got {args.generation}")
    print(export_model_folder(Path(args.src), Path(args.out), generation=generation))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from omnivox.agent.bench import run_benchmark

    assistant = load_model_for_cli(args)
    plain = not (args.load_in_8bit or args.load_in_4bit or args.lora_scale != 1.0)
    folder = model_folder(args) if plain else None
    run_benchmark(assistant, out=Path(args.out) if args.out else None, repeats=args.repeats, folder=folder)
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from omnivox.agent.mcp_server import create_server, run_server, stdout_to_stderr
    from omnivox.agent.workspace import Workspace

    if not 0 < args.port < 65536:
        raise UserInputError(f"--port must be from 1 to 65535, got {args.port}")
    workspace = Workspace(args.allowed_dir)  # checked before a big model loads; None: a temporary one
    with stdout_to_stderr(args.transport):  # the model loads now, before the first client connects
        assistant = load_model_for_cli(args)
    server = create_server(assistant, workspace, paths=args.allowed_dir is not None)
    run_server(server, args.transport, host=args.host, port=args.port)
    return 0


def model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="omnivox model folder (default: the bundled nano model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--load-in-8bit", action="store_true", help="quantize the LLM to 8 bit (bitsandbytes)")
    p.add_argument("--load-in-4bit", action="store_true", help="quantize the LLM to 4 bit NF4 (bitsandbytes)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiply the LoRA update (lower it under 8-bit)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` (the first argument) decides which heavy sub-parsers are built."""
    parser = argparse.ArgumentParser(prog="omnivox", description="LLM-centric audio agent")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="ask questions about audio (interactive without a prompt)")
    model_flags(chat)
    chat.add_argument("--audio", action="append", default=[], metavar="FILE", help="audio file (repeatable)")
    chat.add_argument("--greedy", action="store_true", help="greedy decoding (default: the model's, see its config.json 'generation')")
    chat.add_argument("--num-beams", type=int, default=None, help="beam search width (default: the model's; 4 when it sets none)")
    chat.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default: the model's; 200 when it sets none)")
    chat.add_argument("--ctc-fusion-weight", type=float, default=None,
                      help="weight of the CTC head when decoding transcripts jointly, 0-1 (0: the LLM alone; default: the model's)")  # fmt: skip
    chat.add_argument("--no-transcriber", action="store_true",
                      help="transcripts by the LLM even where the model folder has a Whisper transcriber")  # fmt: skip
    chat.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    chat.add_argument("--out", default=None, metavar="FILE.wav", help="also speak the answer into this WAV file")
    chat.add_argument("--voice", default=None, help="voice of the spoken answer (default: the model's)")
    chat.add_argument("prompt", nargs="*", help="the question; omit for an interactive chat")
    chat.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="make audio by task: tts (text to speech), ns, sr, dereverb, tse (from a clip)")
    if command == "generate":  # the task table lives beside the speech head (torch): built only when used
        add_generate_arguments(gen)
        gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat completions, transcriptions)")
    model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    serve.add_argument("--max-batch-size", type=int, default=8, help="most answers decoded in one batch (default 8)")
    serve.add_argument("--batch-window-ms", type=float, default=10.0,
                       help="how long a request waits for others to batch with (default 10 ms)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="most requests waiting for the model; more are answered 429 with Retry-After (default 64)")
    serve.add_argument("--request-timeout", type=float, default=300.0,
                       help="seconds a request may take, queue included; later is 504 (default 300)")
    serve.add_argument("--max-audio-seconds", type=float, default=600.0, help="longest clip accepted (default 600 s)")
    serve.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask (default 2048)")
    serve.set_defaults(func=cmd_serve)

    agent = sub.add_parser("agent", help="work on a goal with tools (transcribe, trim, mix, ...): calls, results, answer")
    model_flags(agent)
    agent.add_argument("--audio", action="append", default=[], metavar="FILE", help="audio file (repeatable): clip-1, clip-2, ...")
    agent.add_argument("--tools", default=None, help="comma-separated tool names offered (default: all built-in tools)")
    agent.add_argument("--max-steps", type=int, default=6, help="rounds of tool calls before the model must answer (default 6)")
    agent.add_argument("--max-seconds", type=float, default=300.0, help="time budget of the run (default 300)")
    agent.add_argument("--out-dir", default="omnivox-out", help="the allowed directory: audio the tools make is written here")
    agent.add_argument("--raise-tool-errors", action="store_true", help="stop on a tool error instead of telling the model")
    agent.add_argument("--json", action="store_true", help="print the whole trace as JSON")
    agent.add_argument("goal", nargs="+", help="what to do")
    agent.set_defaults(func=cmd_agent)

    convert = sub.add_parser("convert", help="convert checkpoints into omnivox formats")
    csub = convert.add_subparsers(dest="what", required=True)
    cw = csub.add_parser("whisper", help="CTranslate2 Whisper -> openai-whisper .pt")
    add_convert_whisper_arguments(cw)
    cw.set_defaults(func=run_convert_whisper)
    cs = csub.add_parser("salmonn", help="SALMONN .pth -> omnivox model folder")
    add_convert_salmonn_arguments(cs)
    cs.set_defaults(func=run_convert_salmonn)

    data = sub.add_parser("data", help="make training data (data synth: synthetic speech/sound tasks; data tts: read speech in named voices)")
    ev = sub.add_parser("eval", help="evaluate a model folder on a suite (asr, sound, qa, format, multiturn, fixtures, all)")
    # These commands' arguments live in modules that import torch/scipy: build them only when used.
    train = sub.add_parser("train", help="train with a recipe (recipes/*.toml); resumable")
    cache = sub.add_parser("cache-features", help="run the frozen encoders of a recipe over its data once")
    if command in ("train", "cache-features"):
        from omnivox.training.cli import add_cache_arguments, add_train_arguments, run_cache, run_train

        add_train_arguments(train)
        train.set_defaults(func=run_train)
        add_cache_arguments(cache)
        cache.set_defaults(func=run_cache)
    if command == "data":
        from omnivox.datagen import build_synth_parser, run_synth
        from omnivox.datagen.speech_pairs import build_tts_parser, run_tts

        dsub = data.add_subparsers(dest="what", required=True)
        synth = dsub.add_parser("synth", help="reproducible synthetic speech/sound data with task manifests")
        build_synth_parser(synth)
        synth.set_defaults(func=run_synth)
        tts = dsub.add_parser("tts", help="clean read speech in a few named voices (the speech head's data)")
        build_tts_parser(tts)
        tts.set_defaults(func=run_tts)
    if command == "eval":
        from omnivox.evaluation.cli import add_eval_arguments, run_eval

        add_eval_arguments(ev)
        ev.set_defaults(func=run_eval)

    export = sub.add_parser("export", help="make a self-contained model folder from a training run's model folder")
    export.add_argument("src", help="model folder a run wrote (runs/NAME/model)")
    export.add_argument("--out", required=True, help="destination folder (its other files are kept)")
    export.add_argument("--generation", help='default decoding to store, as JSON, e.g. \'{"num_beams": 1}\'')
    export.set_defaults(func=cmd_export)

    mcp = sub.add_parser("mcp", help="MCP server: transcribe, ask and the audio tools for MCP clients")
    model_flags(mcp)
    mcp.add_argument("--transport", choices=("stdio", "http"), default="stdio",
                     help="stdio (default: the client starts this command) or http (Streamable HTTP at /mcp)")  # fmt: skip
    mcp.add_argument("--host", default="127.0.0.1", help="address to bind with --transport http (default: this machine only)")
    mcp.add_argument("--port", type=int, default=8001, help="port with --transport http (default 8001)")
    mcp.add_argument("--allowed-dir", default=None, metavar="DIR",
                     help="the only directory whose files tools read, and where audio they make is written "
                          "(default: none; clients send audio as base64)")  # fmt: skip
    mcp.set_defaults(func=cmd_mcp)

    bench = sub.add_parser("bench", help="measure encoding, time to first token, decode speed, memory")
    model_flags(bench)
    bench.add_argument("--out", help="write the results as JSON here")
    bench.add_argument("--repeats", type=int, default=3)
    bench.set_defaults(func=cmd_bench)
    return parser



def quiet_library_noise() -> None:
    """Hide library chatter that only confuses users of the command line (``--verbose`` keeps it).

    - transformers logs through a stderr handler of its own, not through the root logger that
      ``logging.basicConfig`` sets up, so its level is set here: otherwise every model load
      prints a "LOAD REPORT" table of the checkpoint weights a model leaves unused (the
      decoder, when only the encoder of an HF Whisper checkpoint is loaded; omnivox checks
      the weights it needs itself).
    - transformers' tqdm bars ("Loading weights", "Writing model shards") and huggingface_hub's
      download bars are switched off (transformers' switch turns off both).
    - bitsandbytes warns at import on AVX512-BF16 CPUs that an optional hub kernel is missing
      (its own fallback is used); libraries' deprecation notices likewise.

    What native decoders print while audio is read is kept off the terminal by
    :func:`omnivox.agent.audio.load_audio` itself.
    """
    # through the environment, so that transformers need not be imported here (~0.5 s at every start);
    # a user's own setting of these variables wins
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:  # it reads its variable at import: switch it now
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()
    if "transformers" in sys.modules:  # imported already (an in-process caller): switch it now
        import transformers.utils.logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        quiet_library_noise()
    try:
        return args.func(args)
    except OmnivoxError as err:
        if os.environ.get("OMNIVOX_DEBUG"):
            raise
        message = " ".join(str(err).split())
        print(f"omnivox: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nomnivox: interrupted", file=sys.stderr)
        return 130


# Commands whose process has nothing left to do once they return: the console script ends them
# with os._exit after flushing, skipping the interpreter's teardown of torch and transformers
# (~0.7 s of a 5 s `omnivox chat` on 2 cores). Commands that run worker pools or write files
# in the background (train, data synth, eval) end normally.
FAST_EXIT_COMMANDS = frozenset({"chat", "generate"})


def run() -> None:
    """The ``omnivox`` console script: :func:`main`, then exit (at once for ``FAST_EXIT_COMMANDS``)."""
    argv = sys.argv[1:]
    code = main(argv)
    if next((a for a in argv if not a.startswith("-")), None) in FAST_EXIT_COMMANDS:
        with contextlib.suppress(BrokenPipeError):  # a reader that went away (e.g. `| head`)
            sys.stdout.flush()
            sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
