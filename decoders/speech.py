"""Speaking: the talker and its codec loaded from a model folder, text in, audio out.

A model folder that can speak holds ``talker/`` (``talker.json``: the talker's shape, its voice
table, the default voice and the name of its codec folder; ``talker.safetensors``) next to
that codec folder (``codec/``). :class:`SpeechHead` loads both and turns text into audio:
phonemes (``decoders/phonemes.py``) -> codec codes one frame at a time (``decoders/talker.py``)
-> audio decoded while the codes come (``Codec.stream``), each final piece handed to
``on_audio`` before the next frames are made.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnivox.decoders.codec import Codec, load_codec
from omnivox.decoders.phonemes import PHONEMES, phonemize
from omnivox.decoders.talker import Talker, TalkerConfig, speak, stream_decode
from omnivox.errors import CheckpointError, UserInputError

TALKER_DIR = "talker"
TALKER_CONFIG = "talker.json"
TALKER_WEIGHTS = "talker.safetensors"
MAX_SECONDS = 60.0  # longest answer spoken in one go
MAX_TEXT_CHARS = 4096  # the longest text a door takes to speak (OpenAI's limit on /v1/audio/speech input)
# What a talker can be trained to do; talker.json's "tasks" maps the ones it was trained for to its task rows.
TASKS = {
    "tts": "text to speech",
    "ns": "noise suppression (the speech, without the noise)",
    "sr": "speech removal (the background, without the speech)",
    "dereverb": "dereverberation",
    "tse": "target speaker extraction (the voice of an enrolment clip, from a mixture)",
}
# talker.json task rows of a talker trained here: fixed by the order above, so every talker reads the same row
TASK_ROWS = {name: row for row, name in enumerate(TASKS)}
AUDIO_TASKS = tuple(t for t in TASKS if t != "tts")
NEEDS_PROMPT = frozenset({"tse"})


@dataclass
class SpokenAudio:
    """Audio the model made.

    Attributes:
        waveform: ``[S]`` float32 mono samples in [-1, 1].
        sample_rate: samples per second.
        transcript: the text that was spoken ("" for a task on audio).
        voice: the voice it was spoken in ("" for a task on audio: the input's own).
        codes: ``[K, T]`` the codec codes the talker emitted (int64).
        first_audio_s: seconds from the start of speaking to the first piece of audio.
        seconds_taken: seconds speaking took in all.
    """

    waveform: np.ndarray
    sample_rate: int
    transcript: str
    voice: str
    codes: torch.Tensor | None = None
    first_audio_s: float | None = None
    seconds_taken: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.waveform.size / self.sample_rate


def save_talker(talker: Talker, voices: list[str], codec_name: str, folder: Path, default_voice: str | None = None,
                dtype: torch.dtype | None = None, tasks: dict[str, int] | None = None) -> Path:  # fmt: skip
    """Write ``talker.json`` + ``talker.safetensors`` into ``folder`` (the weights in ``dtype``, e.g.
    bfloat16 to halve the file; they load into a float32 talker unchanged otherwise)."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    if default_voice is not None and default_voice not in voices:
        raise UserInputError(f"default voice {default_voice!r} is not one of the talker's voices {voices}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().to(dtype or v.dtype).contiguous() for k, v in talker.state_dict().items()}
    save_file(state, str(folder / TALKER_WEIGHTS))
    data = {"config": asdict(talker.config), "voices": list(voices), "default_voice": default_voice or voices[0],
            "codec": codec_name, "phonemes": list(PHONEMES), "tasks": dict(tasks or {"tts": 0})}  # fmt: skip
    (folder / TALKER_CONFIG).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


def read_talker_json(folder: Path) -> dict[str, Any]:
    path = Path(folder) / TALKER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    voices = data.get("voices")
    if not isinstance(voices, list) or not voices or not all(isinstance(v, str) and v for v in voices):
        raise CheckpointError(f"{path}: voices must be a non-empty list of names, got {voices!r}")
    if data.get("phonemes") != list(PHONEMES):
        raise CheckpointError(f"{path}: its phoneme table differs from this omnivox's ({len(PHONEMES)} symbols); "
                              "the talker was trained with another inventory")  # fmt: skip
    if not isinstance(data.get("codec"), str) or not data["codec"]:
        raise CheckpointError(f"{path}: codec must name the codec folder")
    default = data.get("default_voice", voices[0])
    if default not in voices:
        raise CheckpointError(f"{path}: default_voice {default!r} is not among voices {voices}")
    tasks = data.setdefault("tasks", {"tts": 0})  # folders written before tasks on audio: text to speech only
    if not isinstance(tasks, dict) or not tasks or not all(isinstance(v, int) and v >= 0 for v in tasks.values()):
        raise CheckpointError(f"{path}: tasks must map task names to task rows, got {tasks!r}")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise CheckpointError(f"{path}: unknown tasks {unknown}; known: {sorted(TASKS)}")
    return data


def load_talker(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Talker, dict[str, Any]]:
    """The talker in ``folder`` (``talker.json`` + ``talker.safetensors``) and its JSON."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    data = read_talker_json(folder)
    if not isinstance(data.get("config"), dict):
        raise CheckpointError(f"{folder / TALKER_CONFIG}: config must be an object")
    config = TalkerConfig.from_dict(data["config"])
    if config.num_voices < len(data["voices"]):
        raise CheckpointError(f"{folder / TALKER_CONFIG}: {len(data['voices'])} voices but a table of {config.num_voices}")
    if max(data["tasks"].values()) >= config.num_tasks or (set(data["tasks"]) - {"tts"} and not config.source_mels):
        raise CheckpointError(f"{folder / TALKER_CONFIG}: tasks {data['tasks']} do not fit a talker with {config.num_tasks} "
                              f"task rows and source_mels {config.source_mels}")  # fmt: skip
    talker = Talker(config)
    try:
        state = load_file(str(folder / TALKER_WEIGHTS))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read {folder / TALKER_WEIGHTS}: {err}") from None
    try:
        talker.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{folder / TALKER_WEIGHTS} does not fit {folder / TALKER_CONFIG}: {err}") from None
    return talker.to(device).eval(), data


class _Run:
    """One request's seeded sampling and timing: ``piece`` is the stream's ``on_audio`` (it notes
    when the first audio came), ``result`` the :class:`SpokenAudio`."""

    def __init__(self, device: torch.device, seed: int | None, on_audio: Callable[[np.ndarray], None] | None) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.on_audio = on_audio
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(seed) % 2**63)

    def piece(self, wav: torch.Tensor) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.started
        if self.on_audio is not None:
            self.on_audio(wav.reshape(-1).float().cpu().numpy())

    def result(self, codes: torch.Tensor, wav: torch.Tensor, rate: int, transcript: str, voice: str,
               details: dict[str, Any]) -> SpokenAudio:  # fmt: skip
        samples = wav.reshape(-1).float().clamp(-1, 1).cpu().numpy()
        return SpokenAudio(samples, rate, transcript, voice, codes[0].cpu(), self.first, time.perf_counter() - self.started,
                           {**details, "frames": int(codes.shape[-1])})  # fmt: skip


class SpeechHead:
    """A talker and the codec it speaks through.

    Args:
        talker: the talker (eval mode).
        codec: the codec whose codes it emits (shapes checked against the talker).
        voices: the names of the talker's voice rows, in order.
        default_voice: the voice used when none is asked for.
    """

    def __init__(self, talker: Talker, codec: Codec, voices: list[str], default_voice: str | None = None,
                 tasks: dict[str, int] | None = None) -> None:  # fmt: skip
        c = talker.config
        if (c.num_codebooks, c.codebook_size) != (codec.num_codebooks, codec.codebook_size):
            raise CheckpointError(f"the talker emits {c.num_codebooks} x {c.codebook_size} codes but the codec takes "
                                  f"{codec.num_codebooks} x {codec.codebook_size}")  # fmt: skip
        self.talker, self.codec = talker, codec
        self.voices = list(voices)
        self.default_voice = default_voice or self.voices[0]
        self.tasks = dict(tasks or {"tts": 0})
        if set(self.tasks) - {"tts"} and not hasattr(codec, "analyse"):
            raise CheckpointError("tasks on audio read the input through the codec's mel analysis; this codec has none")
        if self.default_voice not in self.voices:
            raise CheckpointError(f"default voice {self.default_voice!r} is not among the voices {self.voices}")
        phonemize("Ready.")  # builds the G2P now (about a second), not in the first request

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SpeechHead:
        """Load ``folder/talker`` and the codec folder it names (a sibling: ``folder/codec``).
        ``dtype`` is the talker's (e.g. bfloat16 on a GPU); the codec decodes in float32."""
        folder = Path(folder)
        talker_dir = folder / TALKER_DIR
        talker, data = load_talker(talker_dir, device)
        talker = talker.to(dtype)
        codec_dir = folder / data["codec"]
        if not codec_dir.is_dir():
            raise CheckpointError(f"{talker_dir / TALKER_CONFIG} names the codec folder {data['codec']!r}, "
                                  f"but {codec_dir} does not exist")  # fmt: skip
        codec = load_codec(codec_dir)
        if isinstance(codec, torch.nn.Module):
            codec = codec.to(device)
        return cls(talker, codec, data["voices"], data.get("default_voice"), data["tasks"])

    @staticmethod
    def present(folder: str | Path) -> bool:
        """Whether a model folder holds a talker."""
        return (Path(folder) / TALKER_DIR / TALKER_CONFIG).is_file()

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    def voice_id(self, voice: str | None) -> int:
        name = self.default_voice if voice in (None, "", "default") else voice
        if name not in self.voices:
            # a short name ("jf_gongitsune", "joe") picks the voice whose name ends with it
            matches = [v for v in self.voices if v.split(":", 1)[-1] == name]
            if len(matches) != 1:
                raise UserInputError(f"unknown voice {voice!r}; this model speaks with {self.voices_shown()}")
            name = matches[0]
        return self.voices.index(name)

    def voices_shown(self) -> str:
        return ", ".join(self.voices) + f" (default {self.default_voice})"

    @torch.no_grad()
    def say(
        self, text: str, voice: str | None = None, *, speed: float = 1.0, temperature: float = 0.0, top_k: int = 0,
        seed: int | None = None, on_audio: Callable[[np.ndarray], None] | None = None, chunk_frames: int = 5,
        max_seconds: float = MAX_SECONDS,
    ) -> SpokenAudio:  # fmt: skip
        """Speak ``text`` (text to speech; the talker's task row ``tts``).

        Args:
            voice: one of :attr:`voices` (or the part after ``engine:``); None: the default voice.
            speed: 0.25-4, 1 is the voice's own pace.
            temperature / top_k: 0 picks the likeliest codes (the same audio every time);
                above 0 samples them (``seed`` makes it repeatable).
            on_audio: gets each final piece of audio (``[n]`` float32) as soon as it is decoded.
            chunk_frames: codec frames per piece.
            max_seconds: refuse text that would take longer.
        """
        if not isinstance(text, str) or not text.strip():
            raise UserInputError("there is no text to speak")
        if chunk_frames < 1:
            raise UserInputError(f"chunk_frames must be >= 1, got {chunk_frames}")
        if "tts" not in self.tasks:
            raise UserInputError(f"this talker was not trained for text to speech; it does {sorted(self.tasks)}")
        device = next(self.talker.parameters()).device
        run = _Run(device, seed, on_audio)
        vid = self.voice_id(voice)
        ph = phonemize(text)
        codes, wav = speak(
            self.talker, self.codec, torch.tensor([ph.ids], device=device), run.piece, chunk_frames,
            voice=vid, task=self.tasks["tts"], speed=speed, temperature=temperature, top_k=top_k,
            max_frames=int(max_seconds * self.codec.frame_rate), generator=run.generator,
        )  # fmt: skip
        return run.result(codes, wav, self.sample_rate, text, self.voices[vid], {"phonemes": ph.text})

    def source_frames(self, samples: np.ndarray, sample_rate: int = 16_000) -> torch.Tensor:
        """A mono clip -> the codec's normalised mel frames ``[1, T, M]`` (what tasks on audio read)."""
        import soxr

        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if x.size == 0 or not np.all(np.isfinite(x)):
            raise UserInputError(f"the input clip must be non-empty and finite, got {x.size} samples")
        if sample_rate != self.codec.sample_rate:
            x = soxr.resample(x, sample_rate, self.codec.sample_rate).astype(np.float32)
        device = next(self.talker.parameters()).device
        wav = torch.from_numpy(x)[None].to(device)
        return self.codec.analyse(wav).to(next(self.talker.parameters()).dtype)

    @torch.no_grad()
    def transform(
        self, samples: np.ndarray, task: str, prompt: np.ndarray | None = None, *, sample_rate: int = 16_000,
        temperature: float = 0.0, top_k: int = 0, seed: int | None = None,
        on_audio: Callable[[np.ndarray], None] | None = None, chunk_frames: int = 5, max_seconds: float = 600.0,
    ) -> SpokenAudio:  # fmt: skip
        """A task on audio (``ns``, ``sr``, ``dereverb``, ``tse``): the input clip in, codes out one
        frame per input frame, decoded while they come. ``prompt``: the enrolment clip ``tse`` needs."""
        if task not in AUDIO_TASKS:
            raise UserInputError(f"unknown task on audio {task!r}; known: {sorted(AUDIO_TASKS)}")
        if task not in self.tasks:
            raise UserInputError(f"this model's talker was not trained for {task} ({TASKS[task]}); it does {sorted(self.tasks)}")
        if task in NEEDS_PROMPT and prompt is None:
            raise UserInputError(f"{task} needs an enrolment clip of the voice to keep (prompt)")
        if np.asarray(samples).size > max_seconds * sample_rate:
            raise UserInputError(f"the input clip is {np.asarray(samples).size / sample_rate:.1f} s, over {max_seconds:.0f} s")
        run = _Run(next(self.talker.parameters()).device, seed, on_audio)
        source = self.source_frames(samples, sample_rate)
        enrol = None if prompt is None else self.source_frames(prompt, sample_rate)
        frames = self.talker.generate_from_source(source, self.tasks[task], enrol, temperature, top_k, run.generator)
        codes, wav = stream_decode(frames, self.codec, run.piece, chunk_frames)
        return run.result(codes, wav, self.sample_rate, "", "", {"task": task})
