"""Entry points for ``omnivox train`` and ``omnivox cache-features`` (wired into ``agent/cli.py``).

Also runnable directly, which is how ``torchrun`` starts it::

    python -m omnivox.training train recipes/nano_stage1.toml [--no-resume] [--set optim.lr=5e-4 ...]
    python -m omnivox.training train recipes/nano_beats.toml   # stage sound_encoder: the BEATs-nano encoder
    torchrun --nproc_per_node=2 -m omnivox.training train recipes/nano_stage1.toml
    python -m omnivox.training cache-features recipes/nano_stage1.toml
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training recipe (TOML), e.g. recipes/nano_stage1.toml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key (repeatable), e.g. --set optim.lr=5e-4 --set vars.beats_path=/x.pt",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``omnivox train CONFIG [--resume/--no-resume] [--set k=v ...]``."""
    _common(parser)
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest checkpoint in out_dir if there is one (default: yes)",
    )


def run_train(args: argparse.Namespace) -> int:
    """Run ``omnivox train``; 0 when the run reached max_steps (or stopped at stop_at_step), 130 when interrupted.

    Prints what a finished run made: the model folder, for stage ``sound_encoder`` the BEATs checkpoint,
    for stages ``codec`` / ``talker`` the codec / talker folder.
    """
    from omnivox.training.config import STANDALONE_STAGES, load_train_config

    config = load_train_config(Path(args.config), args.overrides)
    if config.stage in STANDALONE_STAGES:  # each trained by training/<stage>.py's train()
        result = importlib.import_module(f"omnivox.training.{config.stage}").train(
            config, resume=args.resume, progress=args.progress
        )
        made = result.checkpoint
    else:
        from omnivox.training.trainer import train

        result = train(config, resume=args.resume, progress=args.progress)
        made = result.model_dir
    if result.interrupted:
        return 130
    if made is not None:
        print(made)
    return 0


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``omnivox cache-features CONFIG [--split ...]``."""
    _common(parser)
    parser.add_argument(
        "--split",
        action="append",
        choices=("train", "validation", "test"),
        help="splits to encode (repeatable; default: train and validation)",
    )


def run_cache(args: argparse.Namespace) -> int:
    """Run ``omnivox cache-features``: encode every clip of the recipe's dataset once (resumable)."""
    from omnivox.training.build import build_model, feature_geometry, resolve_device
    from omnivox.training.config import STANDALONE_STAGES, ConfigError, load_train_config
    from omnivox.training.data import load_split
    from omnivox.training.features import FeatureCache
    from omnivox.training.trainer import _barrier, init_distributed

    config = load_train_config(Path(args.config), args.overrides)
    if config.stage in STANDALONE_STAGES:
        raise ConfigError(f"{args.config}: stage {config.stage!r} reads its audio directly; it has no feature cache")
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    info = init_distributed(resolve_device(config).type)
    device = resolve_device(config, info.local_rank)
    items = []
    for split in args.split or ["train", "validation"]:
        if (Path(config.data.dir) / f"{split}.jsonl").is_file():
            items += load_split(Path(config.data.dir), split, config.data.tasks)
    root = Path(config.data.cache_dir) if config.data.cache_dir else Path(config.data.dir) / "features"
    cache = FeatureCache(root, feature_geometry(config), config.data.cache_dtype)
    audios = [i.audio for i in items]
    if not cache.missing(audios):
        print(cache.folder)
        return 0
    model = build_model(config, device, load_encoders=True)
    cache.fill(model, audios, {i.audio: i.path for i in items}, info.rank, info.world_size, args.progress and info.rank == 0)
    _barrier(info)
    print(cache.folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m omnivox.training {train,cache-features} ...`` (for torchrun and before the CLI is wired)."""
    from omnivox.errors import OmnivoxError

    parser = argparse.ArgumentParser(prog="python -m omnivox.training")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train from a recipe"))
    add_cache_arguments(sub.add_parser("cache-features", help="precompute the frozen encoders' features"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("omnivox.training").setLevel(logging.INFO)
    try:
        return run_train(args) if args.command == "train" else run_cache(args)
    except OmnivoxError as err:
        print(f"omnivox: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nomnivox: interrupted", file=sys.stderr)
        return 130
