"""The audio tools omnivox offers itself: transcribe, ask, detect_speech, measure, trim, mix, convert,
and, when the model folder has a speech head trained for them, speak and remove_noise.

Each is a typed function (its schema comes from the signature, ``agent/tools.py``) bound to one
:class:`Assistant` and one :class:`Workspace`. Clips are named by workspace ids (``clip-1``,
``audio-2``); audio a tool makes becomes a new ``audio-N`` and the tool answers with a line that
names it (``audio-1: 2.50 s, 16000 Hz``). What the model reads of each result is short and regular,
the form the data generator writes in training (``datagen/task_calls.py``).

Speech detection is Silero VAD (the ``silero-vad`` package ships its weights; MIT); loudness is
ITU-R BS.1770 integrated loudness by ``pyloudnorm``; resampling is soxr.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Annotated, Literal

import numpy as np
import pydantic

from omnivox.agent.tools import ToolError, ToolRegistry, ToolResult, tool
from omnivox.agent.workspace import AudioArtifact, Workspace
from omnivox.decoders.speech import MAX_TEXT_CHARS

log = logging.getLogger(__name__)

TRANSCRIBE = "Transcribe the speech."

# A clip argument is an id the workspace holds; the pattern keeps a model from writing anything else
ClipId = Annotated[str, pydantic.Field(pattern=r"^(clip|audio)-[1-9][0-9]{0,3}$")]
Question = Annotated[str, pydantic.Field(min_length=1, max_length=300)]
Seconds = Annotated[float, pydantic.Field(ge=0, le=3600)]
Gain = Annotated[float, pydantic.Field(ge=-60, le=24)]
Rate = Annotated[int, pydantic.Field(ge=8000, le=48000)]
# The tools the speech head does, and its task each needs (decoders/speech.py TASKS)
SPEECH_TOOL_TASKS = {"speak": "tts", "remove_noise": "ns"}
AUDIO_TASK_TOOLS = tuple(name for name, task in SPEECH_TOOL_TASKS.items() if task != "tts")  # clip in, clip out
SpokenText = Annotated[str, pydantic.Field(min_length=1, max_length=MAX_TEXT_CHARS)]
VoiceName = Annotated[str, pydantic.Field(min_length=1, max_length=64)]


@lru_cache(maxsize=1)
def _vad_model():
    from silero_vad import load_silero_vad

    return load_silero_vad()


def speech_segments(samples: np.ndarray, min_silence: float = 0.3) -> list[tuple[float, float]]:
    """Stretches of 16 kHz ``samples`` [S] where someone speaks, in seconds (Silero VAD)."""
    import torch
    from silero_vad import get_speech_timestamps

    if len(samples) < 512:
        return []
    stamps = get_speech_timestamps(
        torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)),
        _vad_model(),
        sampling_rate=16000,
        min_silence_duration_ms=int(min_silence * 1000),
        return_seconds=True,
    )
    return [(float(s["start"]), float(s["end"])) for s in stamps]


def measure_audio(samples: np.ndarray, sample_rate: int) -> dict[str, float | int | None]:
    """Duration, sample rate, integrated loudness (LUFS; None under 0.4 s or for silence), peak and RMS (dBFS)."""
    import pyloudnorm

    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    loudness = None
    if len(samples) >= int(0.4 * sample_rate) and peak > 0:
        value = pyloudnorm.Meter(sample_rate).integrated_loudness(samples.astype(np.float64))
        loudness = round(float(value), 1) if np.isfinite(value) else None

    def db(x: float) -> float | None:
        return round(20 * np.log10(x), 1) if x > 0 else None

    return {
        "duration": round(len(samples) / sample_rate, 2),
        "sample_rate": sample_rate,
        "loudness_lufs": loudness,
        "peak_dbfs": db(peak),
        "rms_dbfs": db(rms),
    }


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    import soxr

    return samples if rate == target else soxr.resample(samples, rate, target).astype(np.float32)


def speak_into(assistant, workspace: Workspace, text: str, voice: str | None, speed: float = 1.0) -> tuple[AudioArtifact, str]:
    """``text`` said by the assistant's speech head, held (and written) as the next ``audio-N``;
    returns it and the voice's full name."""
    spoken = assistant.speech.say(text, voice, speed=speed)
    made = workspace.put_audio(spoken.waveform, spoken.sample_rate, f"{short_text(text, 40)!r} in {spoken.voice}")
    return made, spoken.voice


def short_text(text: str, limit: int = 80) -> str:
    """``text`` cut after ``limit`` characters (then "...") for a note or a message."""
    return text if len(text) <= limit else text[:limit] + "..."


def builtin_tools(assistant, workspace: Workspace) -> ToolRegistry:
    """The built-in tools bound to ``assistant`` (an :class:`Assistant`) and ``workspace``.
    ``speak`` and ``remove_noise`` are offered only when the assistant's speech head does
    ``tts`` / ``ns`` (all of them when ``assistant`` is None: the list the data generator copies)."""

    def transcript_of(samples: np.ndarray) -> str:
        return assistant.chat(TRANSCRIBE, [samples], assistant.settings()).text.strip()

    @tool
    def transcribe(clip: ClipId, timestamps: bool = False) -> str:
        """Transcribe the speech in a clip.

        Args:
            clip: the clip's id, e.g. clip-1 or audio-2.
            timestamps: give each stretch of speech with its start and end in seconds.
        """
        audio = workspace.get(clip).for_model()
        if not timestamps:
            return transcript_of(audio) or "(no speech)"
        lines = []
        for start, end in speech_segments(audio):
            piece = audio[int(start * 16000) : int(end * 16000)]
            if len(piece) >= 1600:
                lines.append(f"[{start:.2f}-{end:.2f}] {transcript_of(piece)}")
        return "\n".join(lines) or "(no speech)"

    @tool
    def ask(clip: ClipId, question: Question) -> str:
        """Ask a question about what can be heard in a clip.

        Args:
            clip: the clip's id.
            question: the question, in words.
        """
        if not question.strip():
            raise ToolError("the question is empty")
        return assistant.chat(question, [workspace.get(clip).for_model()], assistant.settings()).text.strip()

    @tool
    def detect_speech(clip: ClipId) -> str:
        """Find the stretches of a clip where someone speaks, with start and end in seconds.

        Args:
            clip: the clip's id.
        """
        segments = speech_segments(workspace.get(clip).for_model())
        if not segments:
            return "no speech"
        return json.dumps([{"start": round(s, 2), "end": round(e, 2)} for s, e in segments])

    @tool
    def measure(clip: ClipId) -> str:
        """Measure a clip: duration, sample rate, loudness (LUFS), peak and RMS level (dBFS).

        Args:
            clip: the clip's id.
        """
        item = workspace.get(clip)
        return json.dumps(measure_audio(item.samples, item.sample_rate))

    @tool
    def trim(clip: ClipId, start: Seconds, end: Seconds) -> ToolResult:
        """Cut a clip to the part from start to end (seconds); makes a new audio id.

        Args:
            clip: the clip's id.
            start: where the kept part starts, in seconds.
            end: where it ends, in seconds.
        """
        item = workspace.get(clip)
        if not 0 <= start < end:
            raise ToolError(f"need 0 <= start < end, got start {start} and end {end}")
        if start >= item.duration:
            raise ToolError(f"start {start} s is past the end of {item.id} ({item.duration:.2f} s)")
        a, b = int(round(start * item.sample_rate)), int(round(min(end, item.duration) * item.sample_rate))
        made = workspace.put_audio(item.samples[a:b], item.sample_rate, f"{item.id} from {start} s to {end} s")
        return ToolResult(made.describe(), (made.id,))

    @tool
    def mix(clip: ClipId, other: ClipId, other_gain_db: Gain = 0.0, offset: Seconds = 0.0) -> ToolResult:
        """Mix another clip into a clip, starting at an offset; makes a new audio id.

        Args:
            clip: the clip mixed into (its sample rate is kept).
            other: the clip added.
            other_gain_db: gain applied to the other clip, in dB.
            offset: where the other clip starts, in seconds from the start of the first.
        """
        base, add = workspace.get(clip), workspace.get(other)
        if not 0 <= offset <= 3600 or not -60 <= other_gain_db <= 24:
            raise ToolError(f"offset must be 0-3600 s and other_gain_db -60-24 dB, got {offset} and {other_gain_db}")
        rate = base.sample_rate
        extra = _resample(add.samples, add.sample_rate, rate) * np.float32(10 ** (other_gain_db / 20))
        start = int(round(offset * rate))
        out = np.zeros(max(len(base.samples), start + len(extra)), dtype=np.float32)
        out[: len(base.samples)] += base.samples
        out[start : start + len(extra)] += extra
        peak = float(np.max(np.abs(out))) if len(out) else 0.0
        note = f"{base.id} + {add.id} at {offset} s ({other_gain_db:+.1f} dB)"
        if peak > 1.0:  # scale down rather than clip
            out /= peak
            note += f", scaled by {1 / peak:.2f} to avoid clipping"
        made = workspace.put_audio(out, rate, note)
        return ToolResult(made.describe(), (made.id,))

    @tool
    def convert(clip: ClipId, sample_rate: Rate = 16000, format: Literal["wav", "flac", "mp3", "ogg"] = "wav") -> ToolResult:
        """Resample a clip and write it in another format; makes a new audio id.

        Args:
            clip: the clip's id.
            sample_rate: the new sample rate in Hz (8000 to 48000).
            format: the file format.
        """
        item = workspace.get(clip)
        if not 8000 <= sample_rate <= 48000:
            raise ToolError(f"sample_rate must be 8000-48000 Hz, got {sample_rate}")
        made = workspace.put_audio(
            _resample(item.samples, item.sample_rate, sample_rate), sample_rate, f"{item.id} as {format}", format
        )
        return ToolResult(f"{made.describe()}, {format}", (made.id,))

    @tool
    def speak(text: SpokenText, voice: VoiceName = "default") -> ToolResult:
        """Say a text aloud with a synthetic voice; makes a new audio id.

        Args:
            text: the words to say.
            voice: a voice of the model's, or default.
        """
        made, _ = speak_into(assistant, workspace, text, voice)
        return ToolResult(made.describe(), (made.id,))  # the line the model read in training (datagen/task_calls.py)

    @tool
    def remove_noise(clip: ClipId) -> ToolResult:
        """Remove steady background noise from a clip; makes a new audio id.

        Args:
            clip: the clip's id.
        """
        item = workspace.get(clip)
        cleaned = assistant.speech.transform(item.samples, "ns", sample_rate=item.sample_rate)
        made = workspace.put_audio(cleaned.waveform, cleaned.sample_rate, f"{item.id} without the background noise")
        return ToolResult(made.describe(), (made.id,))

    offered = [transcribe, ask, detect_speech, measure, trim, mix, convert]
    tasks = None if assistant is None else assistant.speech_tasks
    for t in (speak, remove_noise):
        if tasks is None or SPEECH_TOOL_TASKS[t.name] in tasks:
            offered.append(t)
    return ToolRegistry(offered)

