"""``omnivox eval``: the entry point. Thin: it reads flags, loads the model and calls the library.

Wire it into ``omnivox.agent.cli`` with::

    ev = sub.add_parser("eval", help="evaluate a model folder on a suite")
    add_eval_arguments(ev)
    ev.set_defaults(func=run_eval)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omnivox.evaluation.data import SPLITS
from omnivox.evaluation.tasks import SUITES

log = logging.getLogger(__name__)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The eval flags, plus the shared model flags (--model, --device, --dtype, --load-in-8bit/4bit, --lora-scale)."""
    from omnivox.agent.cli import model_flags

    model_flags(parser)
    suites = "; ".join(f"{name}: {text}" for name, text in SUITES.items())
    parser.add_argument("--suite", required=True, choices=list(SUITES), help=f"what to evaluate ({suites})")
    parser.add_argument("--data", help="folder with train/validation/test.jsonl manifests (all suites but fixtures)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="manifest split (default test)")
    parser.add_argument("--out", help="output folder (default <model>/eval/<suite>)")
    parser.add_argument("--limit", type=int, default=None, help="at most N items per task")
    parser.add_argument("--batch-size", type=int, default=8, help="items generated together (default 8)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length limit (default 64; tool-call steps of suite task-calls 160)")
    parser.add_argument("--ctc-fusion-weight", type=float, default=None,
                        help="weight of the CTC head when decoding transcripts jointly, 0-1 (0: the LLM alone; default: the model's)")  # fmt: skip
    parser.add_argument("--no-transcriber", action="store_true",
                        help="transcripts by the LLM even where the model folder has a Whisper transcriber")  # fmt: skip
    parser.add_argument("--fixtures", help="speech fixtures folder (default $OMNIVOX_FIXTURES/speech or ../shared/fixtures/speech)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed set before generating (default 0)")
    parser.add_argument("--codec", help="suite codec: a codec folder (nano codec.json, or an EnCodec HF folder or hub id "
                        "such as facebook/encodec_24khz); default: the model folder's codec/")
    parser.add_argument("--bandwidth", type=float, default=None, help="suite codec: EnCodec bandwidth in kbps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_eval(args: argparse.Namespace) -> int:
    """Run ``omnivox eval``; returns the exit status. User errors raise ``UserInputError`` (the CLI prints them)."""
    from omnivox.agent.cli import load_model_for_cli, model_folder
    from omnivox.agent.generation import GenerationSettings

    if args.suite == "codec":
        return run_codec_eval(args)
    if args.suite == "speech-out":
        return run_speech_out_eval(args)
    from omnivox.evaluation.report import print_table, write_results
    from omnivox.evaluation.runner import run_selection, select, validate

    selection = select(
        args.suite,
        Path(args.data) if args.data else None,
        args.split,
        args.limit,
        Path(args.fixtures) if args.fixtures else None,
    )
    if not selection.items:
        for note in selection.notes:
            print(f"omnivox eval: {note}", file=sys.stderr)
        return 0
    validate(selection)  # before loading a big model
    # the model's own decoding defaults (what `omnivox chat` does), greedy unless --num-beams says otherwise
    overrides = dict(max_new_tokens=args.max_new_tokens or 64, num_beams=args.num_beams, do_sample=False)
    if args.ctc_fusion_weight is not None:
        overrides["ctc_fusion_weight"] = args.ctc_fusion_weight
    if args.no_transcriber:
        overrides["use_transcriber"] = False
    GenerationSettings(**overrides)  # bad flags fail here, not after a big model has loaded
    model_dir = model_folder(args)
    assistant = load_model_for_cli(args, transcriber=not args.no_transcriber)
    settings = assistant.settings(**overrides)
    results = run_selection(
        assistant,
        selection,
        batch_size=args.batch_size,
        settings=settings,
        model_name=str(model_dir),
        seed=args.seed,
        progress=not args.no_progress,
        call_max_new_tokens=args.max_new_tokens,
    )
    out = Path(args.out) if args.out else model_dir / "eval" / args.suite
    files = write_results(results, out)
    print_table(results)
    print(f"results written to {files['results.json'].parent}", file=sys.stderr)
    return 0


def run_codec_eval(args: argparse.Namespace) -> int:
    """``--suite codec``: resynthesis scores of a codec (no LLM is loaded)."""
    from omnivox.agent.cli import model_folder
    from omnivox.decoders.codec import load_codec
    from omnivox.errors import UserInputError
    from omnivox.evaluation.codec import (
        evaluate_codec,
        fixture_clips,
        held_out_clips,
        markdown,
        write_codec_report,
    )
    from omnivox.evaluation.data import default_fixtures_dir

    model_dir = model_folder(args)
    source = Path(args.codec) if args.codec else model_dir / "codec"
    if not args.codec and not source.exists():
        raise UserInputError(f"no codec at {source}: pass --codec DIR (this model folder has no codec/)")
    codec = load_codec(source, bandwidth=args.bandwidth)
    clips = held_out_clips(Path(args.data), args.split, args.limit or 40) if args.data else []
    fixtures = Path(args.fixtures) if args.fixtures else default_fixtures_dir()
    if fixtures is not None and (fixtures / "transcripts.json").is_file():
        clips += fixture_clips(fixtures)
    elif not clips:
        raise UserInputError("suite codec needs clips: --data DIR (a datagen folder) and/or --fixtures DIR")
    report = evaluate_codec(codec, clips, progress=not args.no_progress)
    out = Path(args.out) if args.out else model_dir / "eval" / ("codec" if not args.codec else f"codec-{source.name}")
    write_codec_report(report, out)
    print(markdown(report))
    print(f"results written to {out}", file=sys.stderr)
    return 0


def run_speech_out_eval(args: argparse.Namespace) -> int:
    """``--suite speech-out``: the speech head speaking held-out sentences (no LLM is loaded)."""
    from omnivox.agent.cli import load_speech_for_cli, model_folder
    from omnivox.errors import UserInputError
    from omnivox.evaluation.speech_out import (
        evaluate_speech_out,
        held_out_sentences,
        markdown,
        write_speech_out_report,
    )

    if not args.data:
        raise UserInputError("suite speech-out needs --data DIR (an `omnivox data tts` folder)")
    sentences = held_out_sentences(Path(args.data), args.split, args.limit or 40)
    head = load_speech_for_cli(args)
    report = evaluate_speech_out(head, sentences, progress=not args.no_progress)
    out = Path(args.out) if args.out else model_folder(args) / "eval" / "speech-out"
    write_speech_out_report(report, out)
    print(markdown(report))
    print(f"results written to {out}", file=sys.stderr)
    return 0
