"""The training loop: adapter (+ LoRA) on frozen encoders and a frozen LLM.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` items on every rank.
The loss is the summed token cross-entropy of the answer tokens (plus stop tokens) divided
by the step's label tokens on that rank; DDP averages gradients over ranks. Stage ``ctc``
replaces it by a CTC loss per transcript token (``training/ctc.py``); ``ctc_loss_weight`` adds
that loss to the other stages.

Outputs in ``out_dir``::

    checkpoints/step-00000200/   trainable.safetensors, optimizer.pt (optimizer, scheduler,
                                 scaler, per-rank RNG states), state.json (step, data position)
    checkpoints/.../ctc_head.safetensors   the CTC head, when the run has one
    metrics.jsonl                one JSON object per log / eval event
    curves.png                   loss, learning rate, throughput
    samples.jsonl                greedy answers on validation items at each evaluation
    summary.json                 final step, losses, per-rank weight checksums
    model/                       the trained omnivox model folder (OmnivoxModel.from_pretrained)

A stopped run (Ctrl-C, SIGTERM, ``stop_at_step``, ``time_limit_minutes``, a killed
process) continues from the newest checkpoint with ``resume=True`` and gives the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from omnivox.agent.audio import load_audio
from omnivox.agent.generation import GenerationSettings
from omnivox.agent.model import OmnivoxModel, WindowFeatures
from omnivox.agent.processor import OmnivoxProcessor, TokenizedPrompt
from omnivox.errors import CheckpointError, UserInputError
from omnivox.evaluation.metrics import word_edits
from omnivox.training.build import (
    DTYPES,
    build_model,
    drop_encoders,
    feature_geometry,
    load_trainable_state,
    resolve_device,
    trainable_state,
)
from omnivox.training.config import TrainConfig
from omnivox.training.ctc import CTC_HEAD_FILE, CTCHead, transcript_of
from omnivox.training.data import (
    IGNORE_INDEX,
    BatchPlan,
    Example,
    ManifestItem,
    build_example,
    estimate_length,
    load_split,
)
from omnivox.training.features import FeatureCache

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2


# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        # long timeout: rank 0 may build the feature cache or write plots while others wait
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return info


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _all_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- model wrapper
@dataclass
class Batch:
    """A micro-batch: per item, its windows' encoder features and its tokenized conversation."""

    windows: list[list[WindowFeatures]]
    examples: list[Example]
    ctc_targets: list[list[int]] = field(default_factory=list)

    @property
    def num_label_tokens(self) -> int:
        # a label at position t is predicted from position t-1, so position 0 is never a target
        return sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in self.examples)

    @property
    def num_ctc_targets(self) -> int:
        return sum(len(t) for t in self.ctc_targets)

    @property
    def num_tokens(self) -> int:
        if not self.examples:  # CTC only: the audio tokens are the sequence
            return sum(w.num_tokens for ws in self.windows for w in ws)
        return sum(e.input_ids.numel() for e in self.examples)


class TrainableParts(nn.Module):
    """The adapter, the LLM (and the CTC head) as one module, so DDP sees every trainable parameter.

    ``forward`` returns the summed cross-entropy of a batch's label tokens (``"lm"``, absent
    when ``run_lm`` is False) and the summed CTC loss (``"ctc"``, with a head).
    """

    def __init__(self, model: OmnivoxModel, ctc_head: CTCHead | None = None, run_lm: bool = True) -> None:
        super().__init__()
        self.adapter = model.adapter
        self.llm = model.llm
        self.ctc_head = ctc_head
        self.run_lm = run_lm
        self._owner = [model]  # not a submodule: DDP must not see the frozen encoders

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.losses(batch, self.audio(batch))

    def audio(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Per item its audio tokens [N_i, H] (the adapter runs once over the whole batch)."""
        flat = [w for windows in batch.windows for w in windows]
        tokens = self._owner[0].audio_tokens(flat)  # [sum N_i, H]
        return tokens.split([sum(w.num_tokens for w in ws) for ws in batch.windows])

    def losses(self, batch: Batch, per_item: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.ctc_head is not None:
            out["ctc"] = self.ctc_head.loss(per_item, batch.ctc_targets)[0]
        if self.run_lm:
            out["lm"] = self._lm_loss(batch, per_item)
        return out

    def _lm_loss(self, batch: Batch, per_item: Sequence[torch.Tensor]) -> torch.Tensor:
        embed = self.llm.get_input_embeddings()
        seqs = [
            OmnivoxProcessor.merge(TokenizedPrompt(ex.input_ids, ex.audio_mask), [audio], embed)  # [T_i, H]
            for ex, audio in zip(batch.examples, per_item, strict=True)
        ]
        longest = max(s.shape[0] for s in seqs)
        device = seqs[0].device
        embeds = seqs[0].new_zeros(len(seqs), longest, seqs[0].shape[-1])  # [B, T, H], right-padded
        mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=device)  # [B, T]
        labels = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long, device=device)  # [B, T]
        for i, (seq, ex) in enumerate(zip(seqs, batch.examples, strict=True)):
            embeds[i, : seq.shape[0]] = seq
            mask[i, : seq.shape[0]] = 1
            labels[i, : seq.shape[0]] = ex.labels.to(device)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits  # [B, T, V]
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),  # [B*(T-1), V]
            labels[:, 1:].reshape(-1),  # [B*(T-1)]
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )


# ----------------------------------------------------------------------------- schedule
def lr_factor(step: int, warmup: int, max_steps: int, kind: str, min_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warmup, then decay to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1 - min_ratio) * progress


# ----------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    """How a run ended."""

    step: int
    model_dir: Path | None
    finished: bool
    interrupted: bool = False


class Trainer:
    """Runs one recipe. Build with ``Trainer(config)``, then call :meth:`train`."""

    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.out_dir = Path(config.out_dir)
        if config.threads:
            torch.set_num_threads(config.threads)
        device = resolve_device(config)
        if device.type == "cpu":
            # Confident softmaxes (CTC, LM) underflow into subnormal floats, which x86 CPUs
            # handle ~100x slower: a CTC run slowed from 0.4 to 1 s/step. Flush them to zero.
            torch.set_flush_denormal(True)
        self.dist = init_distributed(device.type)
        self.device = resolve_device(config, self.dist.local_rank)
        self._seed(config.seed)
        data = config.data
        # only clips with a transcript teach CTC
        spoken = (lambda item: transcript_of(item.metadata) is not None) if config.stage == "ctc" else None
        self.train_items = load_split(Path(data.dir), "train", data.tasks, data.max_items, where=spoken)
        self.val_items = load_split(Path(data.dir), "validation", data.tasks, data.eval_items, where=spoken)
        if not self.train_items:
            why = " with a transcript (metadata.text), which stage ctc needs" if config.stage == "ctc" else ""
            raise UserInputError(f"{data.dir}/train.jsonl has no items{why} (after the task filter {list(data.tasks)})")
        self.model = self._build_model()
        # dropout streams: independent of whether encoders / cache were built, different per rank
        self._seed(config.seed + self.dist.rank)
        self.processor = self.model.processor
        self.ctc_head: CTCHead | None = None
        if config.stage == "ctc" or config.ctc_loss_weight > 0:
            self.ctc_head = CTCHead(self.model.llm.get_input_embeddings(), config.ctc_negatives).to(self.device)
            start = Path(config.model.init_from or "") / CTC_HEAD_FILE
            if config.model.init_from and start.is_file():
                self.ctc_head.load_state_dict(load_file(start))
        self.parts = TrainableParts(self.model, self.ctc_head, run_lm=config.stage != "ctc")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.ctc_head is not None:
            self.params += list(self.ctc_head.parameters())
        self.module: nn.Module = self.parts
        if self.dist.enabled:
            self.module = nn.parallel.DistributedDataParallel(
                self.parts,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.optimizer = self._optimizer()
        optim = config.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, optim.warmup_steps, optim.max_steps, optim.scheduler, optim.min_lr_ratio),
        )
        self.scaler = torch.amp.GradScaler("cuda") if config.dtype == "fp16" else None
        per_second = self.model.adapter.tokens_per_second
        lengths = [estimate_length(i, per_second, config.multi_turn) for i in self.train_items]
        self.plan = BatchPlan(lengths, optim.batch_size, config.seed, self.dist.rank, self.dist.world_size)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self._epoch_batches: list[list[int]] | None = None
        n_train = sum(p.numel() for p in self.params)
        if self.dist.is_main:
            log.info(
                "stage %s: %d trainable parameters (%.2f M), %d train / %d validation items, %d rank(s), device %s",
                config.stage, len(self.params), n_train / 1e6, len(self.train_items), len(self.val_items),
                self.dist.world_size, self.device,
            )

    # ---- set-up ----------------------------------------------------------------------------------
    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def _build_model(self) -> OmnivoxModel:
        config = self.config
        self.cache: FeatureCache | None = None
        need_encoders = True
        audios = [i.audio for i in self.train_items + self.val_items]
        if config.data.feature_cache:
            root = Path(config.data.cache_dir) if config.data.cache_dir else Path(config.data.dir) / "features"
            self.cache = FeatureCache(root, feature_geometry(config), config.data.cache_dtype)
            need_encoders = bool(self.cache.missing(audios)) or self.cache.encoder_dims is None
        dims = self.cache.encoder_dims if self.cache is not None else None
        model = build_model(config, self.device, load_encoders=need_encoders, encoder_dims=dims)
        if self.cache is not None and need_encoders:
            resolve = {i.audio: i.path for i in self.train_items + self.val_items}
            self.cache.fill(model, audios, resolve, self.dist.rank, self.dist.world_size, self.progress and self.dist.is_main)
            _barrier(self.dist)
            self.cache.reload()
            left = self.cache.missing(audios)
            if left:
                raise CheckpointError(f"feature cache {self.cache.folder}: {len(left)} clips still missing, e.g. {left[0]}")
            drop_encoders(model)
        return model

    def _optimizer(self) -> torch.optim.Optimizer:
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]  # biases, LayerNorms
        optim = self.config.optim
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr,
            betas=optim.betas,
        )

    def _autocast(self):
        dtype = DTYPES[self.config.dtype]
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- data --------------------------------------------------------------------------------------
    def features(self, item: ManifestItem) -> list[WindowFeatures]:
        """The encoder features of an item's clip: from the cache, or encoded now."""
        if self.cache is not None:
            return self.cache.load(item.audio)
        samples = load_audio(item.path, max_seconds=self.model.config.audio.max_seconds).samples
        return self.model.encode_clip_features(samples)

    def make_batch(self, items: Sequence[ManifestItem]) -> Batch:
        windows = [self.features(i) for i in items]
        examples = []
        if self.parts.run_lm:
            examples = [
                build_example(self.processor, item.messages(self.config.multi_turn), sum(w.num_tokens for w in ws))
                for item, ws in zip(items, windows, strict=True)
            ]
        targets = []
        if self.ctc_head is not None:
            tokenizer = self.processor.tokenizer
            for item in items:
                text = transcript_of(item.metadata)
                targets.append(tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])
        return Batch(windows, examples, targets)

    def _loss(self, sums: dict[str, torch.Tensor], lm_labels: int, ctc_labels: int) -> torch.Tensor:
        """The step's objective from summed losses: each a mean over its own targets."""
        total = sums["lm"] / max(lm_labels, 1) if "lm" in sums else 0.0
        if "ctc" in sums:
            weight = 1.0 if "lm" not in sums else self.config.ctc_loss_weight
            total = total + weight * sums["ctc"] / max(ctc_labels, 1)
        return total

    def _next_batch_indices(self) -> list[int]:
        if self._epoch_batches is None:
            self._epoch_batches = self.plan.epoch(self.epoch)
        if self.position >= len(self._epoch_batches):
            self.epoch += 1
            self.position = 0
            self._epoch_batches = self.plan.epoch(self.epoch)
        indices = self._epoch_batches[self.position]
        self.position += 1
        return indices

    # ---- one step ------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns loss, learning rate, grad norm and token counts (summed over ranks)."""
        optim = self.config.optim
        batches = [self.make_batch([self.train_items[i] for i in self._next_batch_indices()]) for _ in range(optim.grad_accum)]
        labels = sum(b.num_label_tokens for b in batches) if self.parts.run_lm else 0
        ctc_labels = sum(b.num_ctc_targets for b in batches)
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, ctc_sum = 0.0, 0.0
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.module.no_sync()
            with ctx:
                with self._autocast():
                    sums = self.module(batch)
                scaled = self._loss(sums, labels, ctc_labels)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += float(sums["lm"].detach()) if "lm" in sums else 0.0
            ctc_sum += float(sums["ctc"].detach()) if "ctc" in sums else 0.0
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = optim.max_grad_norm if optim.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        loss_sum, labels_all, ctc_sum, ctc_all, tokens = _all_sum(
            [loss_sum, labels, ctc_sum, ctc_labels, sum(b.num_tokens for b in batches)], self.dist, self.device
        )
        stats = {"lr": lr, "grad_norm": grad_norm, "tokens": tokens}
        if self.parts.run_lm:
            stats.update(loss=loss_sum / max(labels_all, 1), labels=labels_all)
        else:  # stage ctc: the CTC loss is the loss
            stats.update(loss=ctc_sum / max(ctc_all, 1), labels=ctc_all)
        if self.ctc_head is not None:
            stats.update(ctc_loss=ctc_sum / max(ctc_all, 1), ctc_labels=ctc_all)
        return stats

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss per label token (over ranks) and a few greedy answers (rank 0, logged)."""
        self.parts.eval()
        items = self.val_items[self.dist.rank :: self.dist.world_size]
        size = self.config.optim.batch_size
        loss_sum, labels, ctc_sum, ctc_labels, errors, words = 0.0, 0, 0.0, 0, 0, 0
        for first in range(0, len(items), size):
            batch = self.make_batch(items[first : first + size])
            with self._autocast():
                per_item = self.parts.audio(batch)
                sums = self.parts.losses(batch, per_item)
                if self.ctc_head is not None:
                    chunk = items[first : first + size]
                    for item, targets, tokens in zip(chunk, batch.ctc_targets, per_item, strict=True):
                        if targets:
                            edits = word_edits(transcript_of(item.metadata), self._ctc_text(tokens))
                            errors, words = errors + edits.errors, words + edits.ref_len
            loss_sum += float(sums["lm"]) if "lm" in sums else 0.0
            ctc_sum += float(sums["ctc"]) if "ctc" in sums else 0.0
            labels += batch.num_label_tokens if self.parts.run_lm else 0
            ctc_labels += batch.num_ctc_targets
        loss_sum, labels, ctc_sum, ctc_labels, errors, words = _all_sum(
            [loss_sum, float(labels), ctc_sum, float(ctc_labels), float(errors), float(words)], self.dist, self.device
        )
        result = {}
        if self.ctc_head is not None:
            result["val_ctc_loss"] = ctc_sum / ctc_labels if ctc_labels else float("nan")
            result["val_ctc_wer"] = errors / words if words else float("nan")
        result["val_loss"] = loss_sum / labels if self.parts.run_lm and labels else result.get("val_ctc_loss", float("nan"))
        if self.dist.is_main and self.config.data.num_generations:
            self._write_samples(self.val_items[: self.config.data.num_generations])
        self.parts.train()
        return result

    def _ctc_text(self, tokens: torch.Tensor) -> str:
        """Best-path CTC decoding of one item's audio tokens [N, H], as text."""
        return self.processor.tokenizer.decode(self.ctc_head.greedy(tokens), skip_special_tokens=True)

    def _save_ctc_head(self, folder: Path) -> None:
        if self.ctc_head is not None:
            state = {k: v.detach().cpu() for k, v in self.ctc_head.state_dict().items()}
            save_file(state, folder / CTC_HEAD_FILE)

    def _write_samples(self, items: Sequence[ManifestItem]) -> None:
        settings = GenerationSettings.greedy(max_new_tokens=64)
        rows = []
        for item in items:
            with self._autocast():
                tokens = self.model.audio_tokens(self.features(item))
                if not self.parts.run_lm:  # stage ctc: show what the CTC head reads
                    rows.append({"step": self.step, "audio": item.audio, "instruction": "(CTC best path)",
                                 "reference": transcript_of(item.metadata), "answer": self._ctc_text(tokens)})  # fmt: skip
                    log.info("step %d | %s | CTC -> %r (reference %r)", self.step, item.audio, rows[-1]["answer"], rows[-1]["reference"])
                    continue
                # the conversation up to its first answer (with the item's system turn: tools, when it offers them)
                conversation = item.messages(multi_turn=False)
                prompt, reference = conversation[:-1], conversation[-1].text
                answer = self.model.generate([prompt], [[tokens]], settings)[0].text
            instruction = next(m.text for m in prompt if m.role == "user")
            rows.append({"step": self.step, "audio": item.audio, "instruction": instruction, "reference": reference, "answer": answer})
            log.info("step %d | %s | %s -> %r (reference %r)", self.step, item.audio, instruction, answer, reference)
        with open(self.out_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in ``out_dir/checkpoints``, oldest first."""
        root = self.out_dir / "checkpoints"
        if not root.is_dir():
            return []
        done = [p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").is_file() and "." not in p.name]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, rng: dict | None = None, position: tuple[int, int] | None = None) -> Path | None:
        """Write the run state at ``self.step`` (all ranks call this; rank 0 writes)."""
        rng = rng if rng is not None else capture_rng()
        states = [None] * self.dist.world_size
        if self.dist.enabled:
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        folder = None
        if self.dist.is_main:
            epoch, pos = position if position is not None else (self.epoch, self.position)
            folder = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            save_file(trainable_state(self.model), partial / "trainable.safetensors")
            self._save_ctc_head(partial)
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None,
                    "rng": states,
                },
                partial / "optimizer.pt",
            )
            state = {"step": self.step, "epoch": epoch, "position": pos, "world_size": self.dist.world_size,
                     "config": self.config.to_dict()}  # fmt: skip
            (partial / "state.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
            for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("saved checkpoint %s", folder)
        _barrier(self.dist)
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        """Restore weights, optimizer, scheduler, scaler, RNG and data position from ``folder``."""
        state = json.loads((folder / "state.json").read_text())
        load_trainable_state(self.model, load_file(folder / "trainable.safetensors"), str(folder))
        if self.ctc_head is not None:
            if not (folder / CTC_HEAD_FILE).is_file():
                raise CheckpointError(f"{folder}: {CTC_HEAD_FILE} is missing, but this run trains a CTC head")
            self.ctc_head.load_state_dict(load_file(folder / CTC_HEAD_FILE))
        blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        if self.scaler and blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self._epoch_batches = None
        if len(blob["rng"]) == self.dist.world_size:
            restore_rng(blob["rng"][self.dist.rank])
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG not restored", len(blob["rng"]), self.dist.world_size)
        old = state.get("config", {})
        now = json.loads(json.dumps(self.config.to_dict(), default=str))
        changed = [k for k in ("model", "data", "optim", "stage", "seed") if old.get(k) != now.get(k)]
        if changed and self.dist.is_main:
            log.warning("resuming %s with changed settings in %s", folder, changed)
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.step, self.epoch, self.position)

    # ---- metrics ------------------------------------------------------------------------------------
    def _log_metrics(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    # ---- the loop ---------------------------------------------------------------------------------------
    def train(self, resume: bool = True) -> TrainResult:
        """Train to ``optim.max_steps`` (or ``stop_at_step`` / the time limit), checkpointing on the way."""
        config, optim = self.config, self.config.optim
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
        _barrier(self.dist)
        found = self.checkpoints()
        if resume and found:
            self.load_checkpoint(found[-1])
        elif found and self.dist.is_main:
            log.warning("%s holds checkpoints but resume is off: starting from step 0", self.out_dir)
        target = min(optim.max_steps, config.stop_at_step) if config.stop_at_step else optim.max_steps
        start_time = time.monotonic()
        bar = tqdm(total=optim.max_steps, initial=self.step, desc=f"train {config.stage}", unit="step",
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=True)  # fmt: skip
        window: list[dict] = []
        last_saved = self.step
        interrupted = False
        snapshot = (capture_rng(), (self.epoch, self.position))
        previous_handler = _install_sigterm()
        try:
            while self.step < target:
                snapshot = (capture_rng(), (self.epoch, self.position))
                t0 = time.monotonic()
                stats = self.train_step()
                stats["seconds"] = time.monotonic() - t0
                window.append(stats)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}")
                if self.step % config.log_every == 0 or self.step == target:
                    self._log_window(window, start_time)
                    window = []
                if config.eval_every and self.val_items and (self.step % config.eval_every == 0 or self.step == optim.max_steps):
                    row = {"step": self.step, **self.evaluate()}
                    self._log_metrics(row)
                    bar.write(f"step {self.step}: validation loss {row['val_loss']:.4f}")
                    self._plot()
                over_time = config.time_limit_minutes and time.monotonic() - start_time > 60 * config.time_limit_minutes
                if (config.save_every and self.step % config.save_every == 0) or self.step == target or over_time:
                    self.save_checkpoint()
                    last_saved = self.step
                    self._plot()
                if over_time:
                    log.warning("time limit of %.1f min reached at step %d", config.time_limit_minutes, self.step)
                    break
        except KeyboardInterrupt:
            interrupted = True
            bar.close()
            if self.dist.enabled:
                raise
            if self.step > last_saved:
                # weights are those after the last finished step; RNG and data position from its end
                self.save_checkpoint(rng=snapshot[0], position=snapshot[1])
            log.warning("interrupted at step %d; rerun the same command to resume", self.step)
            return TrainResult(self.step, None, finished=False, interrupted=True)
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        finished = self.step >= optim.max_steps
        model_dir = self._finish(finished)
        return TrainResult(self.step, model_dir, finished=finished, interrupted=interrupted)

    def _log_window(self, window: list[dict], start_time: float) -> None:
        seconds = sum(w["seconds"] for w in window)
        labels = sum(w["labels"] for w in window)
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": sum(w["loss"] * w["labels"] for w in window) / max(labels, 1),
            "lr": window[-1]["lr"],
            "grad_norm": window[-1]["grad_norm"],
            "s_per_step": seconds / len(window),
            "tokens_per_s": sum(w["tokens"] for w in window) / max(seconds, 1e-9),
            "peak_mem_gb": self._peak_memory_gb(),
            "elapsed_s": time.monotonic() - start_time,
        }
        self._log_metrics(row)

    def _plot(self) -> None:
        if self.dist.is_main:
            from omnivox.training.plots import plot_metrics

            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")

    def _finish(self, finished: bool) -> Path | None:
        """Check that ranks agree, write summary.json, and (when finished) the model folder."""
        digest = hashlib.sha256()
        for name, tensor in sorted(trainable_state(self.model).items()):
            digest.update(name.encode())
            digest.update(tensor.float().numpy().tobytes())
        checksums = [None] * self.dist.world_size
        if self.dist.enabled:
            dist.all_gather_object(checksums, digest.hexdigest())
        else:
            checksums = [digest.hexdigest()]
        model_dir = None
        if self.dist.is_main:
            if len(set(checksums)) != 1:
                log.error("ranks ended with different weights: %s", checksums)
            if finished:
                model_dir = self.out_dir / "model"
                self.model.eval()
                self.model.save_pretrained(model_dir)
                self._save_ctc_head(model_dir)
                log.info("saved the trained model to %s", model_dir)
            summary = {"step": self.step, "finished": finished, "world_size": self.dist.world_size,
                       "rank_checksums": checksums, "model": str(model_dir) if model_dir else None}  # fmt: skip
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._plot()
        _barrier(self.dist)
        return model_dir


def _install_sigterm():
    """Turn SIGTERM into KeyboardInterrupt (a killed session saves a checkpoint like Ctrl-C)."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def train(config: TrainConfig, resume: bool = True, progress: bool = True) -> TrainResult:
    """Build a :class:`Trainer` for ``config`` and run it."""
    return Trainer(config, progress=progress).train(resume=resume)

