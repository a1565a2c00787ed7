"""``omnivox convert whisper|salmonn``: the arguments and the functions the CLI table points at."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_convert_whisper_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output .pt file")
    parser.add_argument("--from", dest="src", help="CTranslate2 Whisper folder (default: bundled tiny.en)")


def run_convert_whisper(args: argparse.Namespace) -> int:
    from omnivox.convert.whisper_ct2 import convert_ctranslate2_whisper

    print(convert_ctranslate2_whisper(Path(args.src) if args.src else None, Path(args.out)))
    return 0


def add_convert_salmonn_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="salmonn_v1.pth / salmonn_7b_v0.pth")
    parser.add_argument("--whisper", required=True, help="Whisper: HF folder/id, openai-whisper .pt or name")
    parser.add_argument("--beats", required=True, help="BEATs checkpoint .pt")
    parser.add_argument("--llm", required=True, help="Vicuna: HF folder or hub id")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--qformer-heads", type=int, default=None,
                        help="Q-Former heads (not stored in the file; default 12 for hidden 768, required otherwise)")  # fmt: skip


def run_convert_salmonn(args: argparse.Namespace) -> int:
    from omnivox.convert.salmonn import convert_salmonn

    out = convert_salmonn(
        ckpt=Path(args.ckpt),
        whisper=args.whisper,
        beats=args.beats,
        llm=args.llm,
        out=Path(args.out),
        num_heads=args.qformer_heads,
    )
    print(out)
    return 0
