"""Audio input: every waveform that enters omnivox from outside goes through :func:`load_audio`.

Sources are untrusted (a user's path, an HTTP upload, an array from another program), so
everything is checked where it enters and rejected with an :class:`~omnivox.errors.AudioInputError`
whose one-line message names the input and says what is wrong, with the numbers::

    path | bytes | array [S], [C, S] or [S, C]  ->  Audio(samples [S] float32 mono @ 16 kHz)

Pipeline:

1. Decode. Paths and bytes go to libsndfile (via ``soundfile``: wav, flac, ogg/vorbis/opus,
   mp3 with libsndfile >= 1.1, aiff, ...). Anything libsndfile cannot open (m4a, webm, wma,
   ...) goes to the ``ffmpeg`` command line tool: no shell, local files only, a fixed list of
   audio/video containers, decoded to 32-bit float WAV on a pipe. Integer PCM is scaled to
   [-1, 1) (int16 / 32768, and so on); nothing is clipped. A WAV cut short (its header
   declares more frames than the file holds) is read as far as it goes, with one warning.
   What libsndfile's decoders print on the process's stderr is logged at INFO instead.
2. Check: sample rate in [1000, 384000] Hz, at least one sample, no NaN/inf, at most
   ``max_seconds`` long (never truncated). A float peak above 1.0 is logged, not clipped.
3. Mix down to mono: channel 0 by default, as SALMONN does (``channel="first"``), or the
   mean of all channels (``channel="mean"``).
4. Resample to 16 kHz with soxr (``"HQ"`` quality).

Long audio is cut into model windows by :func:`split_windows`. Audio sent as text (base64 in a
JSON body or a tool argument, or a ``data:`` URL) becomes a file's bytes with :func:`base64_bytes`
and :func:`data_url_bytes`, which check it just as strictly before :func:`load_audio` sees it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import soundfile as sf
import soxr

from omnivox.errors import AudioInputError

logger = logging.getLogger(__name__)

TARGET_SAMPLE_RATE = 16_000  # what every encoder takes (omnivox.encoders.base.SAMPLE_RATE)
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
# A 2-D array's channel axis is the one with at most this many entries (see load_audio).
MAX_ARRAY_CHANNELS = 64
RESAMPLE_QUALITY = "HQ"  # soxr's "high quality" preset
FFMPEG_TIMEOUT_S = 300.0

# Containers ffmpeg may open (its demuxer names). Playlist and concat demuxers (hls, concat, ...)
# are left out on purpose: they make ffmpeg read other files or URLs named inside the input.
_FFMPEG_DEMUXERS = (
    "aac", "ac3", "aiff", "amr", "ape", "asf", "au", "caf", "dts", "eac3", "flac", "matroska", "mov",
    "mp3", "mpc", "mpc8", "ogg", "tta", "w64", "wav", "webm", "wv",
)  # fmt: skip

Channel = Literal["first", "mean"]

# [S, C] -> [S]: one explicit table of the supported mix-downs.
_MIXDOWN: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "first": lambda x: x[:, 0],  # SALMONN: channel 0 of multi-channel audio
    "mean": lambda x: x.mean(axis=1, dtype=np.float32),
}

# Integer PCM dtype -> (offset, scale): float = (int - offset) / scale, giving [-1, 1).
_INT_PCM: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.int8): (0.0, 2.0**7),
    np.dtype(np.uint8): (128.0, 2.0**7),  # 8-bit WAV is unsigned, centred on 128
    np.dtype(np.int16): (0.0, 2.0**15),
    np.dtype(np.int32): (0.0, 2.0**31),
}

AudioSource = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray | Any  # Any: torch.Tensor

# data:[<type>/<subtype>][;<parameter>]*,<data> (RFC 2397; the scheme is case-insensitive)
DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL | re.IGNORECASE
)


@dataclass(frozen=True, eq=False)
class Audio:
    """A mono waveform ready for the encoders.

    Attributes:
        samples: [S] float32 samples, nominally in [-1, 1] (not clipped).
        sample_rate: samples per second of ``samples`` (16000 from :func:`load_audio`).
        source: the input's name for messages: a path, ``"<bytes>"``, ``"<array>"`` or the
            ``name=`` given to :func:`load_audio`.
        original_sample_rate: sample rate of the input before resampling.
        original_channels: channel count of the input before the mix-down.
    """

    samples: np.ndarray = field(repr=False)
    sample_rate: int
    source: str
    original_sample_rate: int
    original_channels: int

    def __post_init__(self) -> None:
        if (
            not isinstance(self.samples, np.ndarray)
            or self.samples.ndim != 1
            or self.samples.dtype != np.float32
        ):
            shape = getattr(self.samples, "shape", None)
            dtype = getattr(self.samples, "dtype", type(self.samples).__name__)
            raise ValueError(
                f"Audio.samples must be a 1-D float32 numpy array [S], got shape {shape} dtype {dtype}"
            )
        if self.sample_rate <= 0 or self.original_sample_rate <= 0 or self.original_channels <= 0:
            raise ValueError(
                f"Audio rates and channels must be positive, got sample_rate={self.sample_rate}, "
                f"original_sample_rate={self.original_sample_rate}, original_channels={self.original_channels}"
            )

    @property
    def num_samples(self) -> int:
        """S, the number of samples."""
        return int(self.samples.shape[0])

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.num_samples / self.sample_rate

    def __repr__(self) -> str:
        return (
            f"Audio(source={self.source!r}, duration={self.duration:.3f} s, sample_rate={self.sample_rate}, "
            f"original_sample_rate={self.original_sample_rate}, original_channels={self.original_channels})"
        )


@dataclass(frozen=True)
class _Decoded:
    """Decoder output before the checks: data [S, C] float32 at ``sample_rate``."""

    data: np.ndarray
    sample_rate: int
    decoder: str


def load_audio(
    source: AudioSource,
    *,
    sample_rate: int | None = None,
    max_seconds: float | None = 600.0,
    name: str | None = None,
    channel: Channel = "first",
) -> Audio:
    """Load untrusted audio as a 16 kHz mono float32 :class:`Audio`.

    Args:
        source: one of
            - a path (``str`` or ``os.PathLike``) to an audio or video file;
            - ``bytes``/``bytearray``/``memoryview`` holding a whole file (e.g. an HTTP upload);
            - a numpy array or torch tensor of samples, with ``sample_rate=``. Shapes: [S] mono,
              or 2-D [C, S] or [S, C]: the channel axis is the one with at most
              ``MAX_ARRAY_CHANNELS`` (64) entries while the other has more; anything else is
              rejected as ambiguous rather than guessed. Dtypes: float16/32/64 (taken as is),
              int8/int16/int32/uint8 PCM (scaled to [-1, 1)); bfloat16/float16 tensors are
              converted to float32.
        sample_rate: the array's sample rate in Hz; required for arrays, refused for files
            and bytes (they carry their own).
        max_seconds: longest accepted duration in seconds; longer input is rejected, never
            truncated. ``None`` accepts any length.
        name: how to call the input in messages and ``Audio.source`` (e.g. the upload's file
            name); defaults to the path, ``"<bytes>"`` or ``"<array>"``.
        channel: mix-down of multi-channel input: ``"first"`` keeps channel 0 (what SALMONN
            does), ``"mean"`` averages all channels.

    Returns:
        ``Audio`` with ``samples`` [S] float32 at 16000 Hz.

    Raises:
        AudioInputError: the input cannot be used; the message names it and the problem.
        ValueError: ``channel`` or ``max_seconds`` is not a valid setting.
        TypeError: ``source`` is none of the types above.
    """
    if channel not in _MIXDOWN:
        raise ValueError(f"channel must be one of {sorted(_MIXDOWN)}, got {channel!r}")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number or None, got {max_seconds!r}")

    if isinstance(source, str | os.PathLike):
        label = _display(name if name is not None else os.fspath(source))
        _refuse_sample_rate(sample_rate, label)
        decoded = _decode_path(Path(os.fspath(source)), label, max_seconds)
    elif isinstance(source, bytes | bytearray | memoryview):
        label = _display(name if name is not None else "<bytes>")
        _refuse_sample_rate(sample_rate, label)
        decoded = _decode_bytes(bytes(source), label, max_seconds)
    elif isinstance(source, np.ndarray) or _is_torch_tensor(source):
        label = _display(name if name is not None else "<array>")
        decoded = _from_array(source, sample_rate, label)
    else:
        raise TypeError(
            f"load_audio takes a path, bytes, a numpy array or a torch tensor, got {type(source).__name__}"
        )

    return _finish(decoded, label, max_seconds, channel)


def split_windows(num_samples: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Cut ``num_samples`` into windows ``(start, end)`` that cover the signal in order.

    Windows are ``window`` samples long and start every ``window - overlap`` samples; the
    last one ends at ``num_samples`` and may be shorter. No window lies wholly inside the
    previous one, and a signal shorter than ``window`` gives one short window.

    Example: ``split_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]``;
    ``split_windows(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (9, 11)]``.

    Args:
        num_samples: S, the signal length (>= 0; 0 gives no windows).
        window: samples per window (> 0).
        overlap: samples shared by consecutive windows (0 <= overlap < window).

    Raises:
        ValueError: an argument is out of range; the message has the values.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if window <= 0:
        raise ValueError(f"window must be > 0 samples, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(
            f"overlap must satisfy 0 <= overlap < window, got overlap={overlap}, window={window}"
        )
    hop = window - overlap
    windows: list[tuple[int, int]] = []
    start = 0
    while start < num_samples:
        end = min(start + window, num_samples)
        windows.append((start, end))
        if end == num_samples:
            break
        start += hop
    return windows


# ---------------------------------------------------------------------------------------------
# Audio sent as text: base64 and data URLs (nothing is ever downloaded).


def base64_bytes(data: Any, where: str, max_chars: int | None = None) -> bytes:
    """The file bytes that base64 text ``data`` holds; whitespace (line breaks) in it is ignored.

    Args:
        data: the base64 text, as received (anything else is refused).
        where: which input it is, for messages (e.g. ``"audio_base64"``, a JSON path).
        max_chars: most characters taken (None: no limit), checked before decoding.

    Raises:
        AudioInputError: ``data`` is not a non-empty string, is too long, is not valid base64
            (strict alphabet and padding), or holds no bytes; the message starts with ``where``.
    """
    if not isinstance(data, str) or not data.strip():
        shown = "an empty string" if isinstance(data, str) else type(data).__name__
        raise AudioInputError(f"{where}: the audio must be a non-empty base64 string, got {shown}")
    if max_chars is not None and len(data) > max_chars:
        raise AudioInputError(f"{where}: {len(data)} base64 characters, more than the {max_chars} taken")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as err:  # ValueError: characters outside ASCII
        raise AudioInputError(f"{where}: the audio is not valid base64 ({err})") from None
    if not raw:
        raise AudioInputError(f"{where}: no audio bytes")
    return raw


def data_url_bytes(url: Any, where: str, max_chars: int | None = None) -> tuple[bytes, str | None]:
    """The file bytes and MIME type (None when it names none) of ``data:<type>;base64,<data>``.

    Only base64 data URLs are read: other URLs are refused, never downloaded.

    Args:
        url: the URL, as received (surrounding whitespace is ignored).
        where: which input it is, for messages.
        max_chars: most base64 characters taken (see :func:`base64_bytes`).

    Raises:
        AudioInputError: not a data URL, not a base64 one, or its data is not usable base64.
    """
    if not isinstance(url, str):
        raise AudioInputError(f"{where}: an audio URL must be a string, got {type(url).__name__}")
    match = DATA_URL.match(url.strip())
    if match is None or ";base64" not in match.group("params").lower():
        shown = repr(url[:40] + ("..." if len(url) > 40 else ""))
        if url.strip()[:5].lower() == "data:":
            raise AudioInputError(
                f"{where}: must be a base64 data URL, data:<type>;base64,<data>, got {shown}"
            )
        raise AudioInputError(
            f"{where}: audio URLs must be data URLs (data:audio/wav;base64,...); nothing is downloaded, got {shown}"
        )
    return base64_bytes(match.group("data"), where, max_chars), match.group("mime")


# ---------------------------------------------------------------------------------------------
# Decoders: each returns _Decoded (data [S, C] float32) or raises AudioInputError.


def _decode_path(path: Path, label: str, max_seconds: float | None) -> _Decoded:
    if not path.exists():
        _fail(label, "file not found")
    if path.is_dir():
        _fail(label, "is a directory, not an audio file")
    if not path.is_file():  # FIFOs and devices (/dev/zero) would block or never end
        _fail(label, "is not a regular file")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as e:
        _fail(label, f"cannot be read ({e.strerror or e})")
    if size == 0:
        _fail(label, "file is empty (0 bytes)")
    try:
        return _read_soundfile(str(path), label, max_seconds, decoder="libsndfile")
    except (sf.SoundFileError, RuntimeError) as e:
        sndfile_reason = _sndfile_reason(e)
    logger.debug("libsndfile cannot open %s (%s); trying ffmpeg", label, sndfile_reason)
    return _decode_ffmpeg(path, label, max_seconds, sndfile_reason)


def _decode_bytes(data: bytes, label: str, max_seconds: float | None) -> _Decoded:
    if not data:
        _fail(label, "is empty (0 bytes)")
    try:
        return _read_soundfile(io.BytesIO(data), label, max_seconds, decoder="libsndfile")
    except (sf.SoundFileError, RuntimeError) as e:
        sndfile_reason = _sndfile_reason(e)
    logger.debug("libsndfile cannot open %s (%s); trying ffmpeg", label, sndfile_reason)
    # A temporary file rather than stdin: mp4/m4a often keep their index at the end and
    # ffmpeg must seek to it.
    with tempfile.TemporaryDirectory(prefix="omnivox-audio-") as tmp:
        path = Path(tmp) / "input"
        path.write_bytes(data)
        return _decode_ffmpeg(path, label, max_seconds, sndfile_reason)


def _read_soundfile(
    file: str | io.BytesIO, label: str, max_seconds: float | None, *, decoder: str, capped: bool = False
) -> _Decoded:
    """Decode with libsndfile, reading at most one frame past ``max_seconds``.

    Lets ``sf.SoundFileError`` through when libsndfile cannot open ``file`` (the caller may try
    ffmpeg); raises AudioInputError for files it opens but that break the rules. ``capped``
    says ffmpeg stopped decoding at ``max_seconds`` + 1 s, so the true length is unknown.
    """
    with _native_stderr_to_log(label), sf.SoundFile(file) as f:
        rate = int(f.samplerate)
        _check_sample_rate(rate, label)
        max_frames = -1 if max_seconds is None else math.floor(max_seconds * rate)
        if max_frames >= 0 and f.frames > max_frames and not capped:
            _too_long(label, f"is {f.frames / rate:.1f} s long", max_seconds)
        data = f.read(
            frames=-1 if max_frames < 0 else max_frames + 1, dtype="float32", always_2d=True
        )  # [S, C]
        is_wav = f.format in ("WAV", "WAVEX")
    if max_frames >= 0 and data.shape[0] > max_frames:
        # The header understated the length (or ffmpeg stopped early): say what we know.
        _too_long(label, f"is longer than {data.shape[0] / rate:.1f} s", max_seconds)
    if is_wav and decoder == "libsndfile":  # ffmpeg's WAV on a pipe has no length in its header
        _warn_if_truncated_wav(file, label, data.shape[0], rate)
    return _Decoded(data=data, sample_rate=rate, decoder=decoder)


def _warn_if_truncated_wav(file: str | io.BytesIO, label: str, frames_read: int, rate: int) -> None:
    """Log one warning when a WAV header declares more frames than the file holds.

    A download or a recording cut short leaves the header's 'data' size larger than the bytes
    present; libsndfile then quietly reports (and reads) only the frames present, so the header
    is read here, as sox ("Premature EOF") and ffmpeg do. The frames read are still used.
    """
    declared = _wav_declared_frames(file)
    if declared is not None and declared > frames_read:
        logger.warning(
            "%s: truncated file: its header declares %d frames (%.2f s), only %d frames (%.2f s) could be "
            "read; using those",
            label, declared, declared / rate, frames_read, frames_read / rate,
        )  # fmt: skip


# 'data' sizes that mean "length unknown": left by writers on a pipe (0, 0xFFFFFFFF; sox 0x7FFFF000)
# and by RF64, which keeps the real size in its ds64 chunk.
_WAV_UNKNOWN_SIZES = (0, 0x7FFFF000, 0xFFFFFFFF)
_MAX_RIFF_CHUNKS = 64  # bounds the walk over an untrusted header


def _wav_declared_frames(file: str | io.BytesIO) -> int | None:
    """Frames the 'data' chunk of a RIFF (or big-endian RIFX) WAVE header declares; None if unknown."""
    with open(file, "rb") if isinstance(file, str) else contextlib.nullcontext(file) as f:
        f.seek(0)
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None
        endian = "<" if head[:4] == b"RIFF" else ">"
        block_align = 0  # bytes per frame, from the 'fmt ' chunk
        for _ in range(_MAX_RIFF_CHUNKS):
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, (size,) = chunk[:4], struct.unpack(endian + "I", chunk[4:])
            if chunk_id == b"data":
                return None if block_align == 0 or size in _WAV_UNKNOWN_SIZES else size // block_align
            start = f.tell()
            if chunk_id == b"fmt ":
                fmt = f.read(16)  # format tag, channels, rate, bytes/s, block align, bits
                if len(fmt) < 16:
                    return None
                (block_align,) = struct.unpack_from(endian + "H", fmt, 12)
            f.seek(start + size + (size & 1))  # chunks are padded to an even length
    return None


# dup2 on file descriptor 2 affects the whole process: one capture at a time.
_NATIVE_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _native_stderr_to_log(label: str) -> Iterator[None]:
    """Keep what native decoders write to file descriptor 2 off the terminal; log it at INFO instead.

    libsndfile's mp3 decoder (mpg123) prints lines such as "Note: Illegal Audio-MPEG-Header ..."
    with C's stderr while it probes a file, out of reach of ``sys.stderr`` and ``logging``. Here
    fd 2 points at a temporary file during the decode; its text is logged (``omnivox -v``
    shows it) and a failure still becomes one AudioInputError. Anything another thread writes
    to stderr in that time is logged the same way.
    """
    with _NATIVE_STDERR_LOCK, tempfile.TemporaryFile() as sink:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr (fd 2 closed): nothing to keep off it
            yield
            return
        _flush_stderr()  # Python's pending text goes where it was meant to go
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().decode("utf-8", "replace").splitlines()
            said = " | ".join(line.strip() for line in lines if line.strip())
            if said:
                logger.info("%s: the decoder said: %s", label, said)


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):  # a replaced sys.stderr may be closed or None
        sys.stderr.flush()


def _decode_ffmpeg(path: Path, label: str, max_seconds: float | None, sndfile_reason: str) -> _Decoded:
    exe = shutil.which("ffmpeg")
    if exe is None:
        _fail(
            label,
            f"cannot decode: libsndfile does not read it ({sndfile_reason}) and ffmpeg, needed for m4a, "
            "webm and other formats, is not installed; install ffmpeg or convert the file to wav/flac",
        )
    cmd = [
        exe, "-nostdin", "-hide_banner", "-loglevel", "error",
        "-protocol_whitelist", "file", "-format_whitelist", ",".join(_FFMPEG_DEMUXERS),
        "-i", f"file:{path.resolve()}",  # "file:" so names like "http:x" or "-x" stay local file names
        "-map", "0:a:0",  # first audio stream; video, subtitles and data are ignored
    ]  # fmt: skip
    if max_seconds is not None:
        cmd += ["-t", f"{max_seconds + 1.0:.6f}"]  # bound the work; one extra second detects "too long"
    cmd += ["-c:a", "pcm_f32le", "-f", "wav", "pipe:1"]  # native rate and channels; we resample
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        _fail(label, f"ffmpeg did not finish decoding within {FFMPEG_TIMEOUT_S:.0f} s")
    if proc.returncode != 0 or not proc.stdout:
        # Drop ffmpeg's "file:/tmp/...: " prefix: the label already names the input.
        stderr = proc.stderr.decode("utf-8", "replace").replace(f"file:{path.resolve()}: ", "")
        ffmpeg_reason = _one_line(stderr) or f"exit status {proc.returncode}"
        _fail(
            label,
            f"cannot decode: not a supported audio format, or corrupt (libsndfile: {sndfile_reason}; "
            f"ffmpeg: {ffmpeg_reason})",
        )
    try:
        return _read_soundfile(
            io.BytesIO(proc.stdout), label, max_seconds, decoder="ffmpeg", capped=max_seconds is not None
        )
    except (sf.SoundFileError, RuntimeError) as e:  # ffmpeg wrote something libsndfile cannot parse
        _fail(label, f"cannot decode: ffmpeg output is unreadable ({_sndfile_reason(e)})")


def _from_array(x: Any, sample_rate: int | None, label: str) -> _Decoded:
    """numpy array / torch tensor [S], [C, S] or [S, C] -> _Decoded with data [S, C] float32."""
    if sample_rate is None:
        _fail(label, "sample_rate= is required for arrays (the samples do not say their rate)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | float | np.integer | np.floating):
        _fail(label, f"sample_rate must be a number of Hz, got {type(sample_rate).__name__}")
    if not math.isfinite(sample_rate) or sample_rate != int(sample_rate):
        _fail(label, f"sample_rate must be a whole number of Hz, got {sample_rate}")
    rate = int(sample_rate)
    _check_sample_rate(rate, label)

    array = _tensor_to_numpy(x) if not isinstance(x, np.ndarray) else x
    if array.ndim not in (1, 2):
        _fail(label, f"expected a 1-D [S] or 2-D [C, S] / [S, C] array, got shape {tuple(array.shape)}")
    if array.size == 0:
        _fail(label, f"has no samples (shape {tuple(array.shape)})")

    if array.ndim == 1:
        frames = array[:, None]  # [S, 1]
    elif array.shape[0] <= MAX_ARRAY_CHANNELS < array.shape[1]:
        frames = array.T  # [C, S] -> [S, C]
    elif array.shape[1] <= MAX_ARRAY_CHANNELS < array.shape[0]:
        frames = array  # [S, C]
    else:
        _fail(
            label,
            f"cannot tell the channel axis of shape {tuple(array.shape)}: a 2-D array needs one axis of "
            f"at most {MAX_ARRAY_CHANNELS} channels and one of more than {MAX_ARRAY_CHANNELS} samples; "
            "pass mono audio as a 1-D [S] array",
        )

    dtype = frames.dtype
    if dtype.kind == "f":
        data = frames.astype(np.float32)  # float64 beyond float32's range becomes inf and is rejected
    elif dtype in _INT_PCM:
        offset, scale = _INT_PCM[dtype]
        data = ((frames.astype(np.float32) - np.float32(offset)) / np.float32(scale)).astype(np.float32)
    else:
        _fail(
            label,
            f"unsupported sample dtype {dtype}: use float16/32/64 in [-1, 1] or int8/int16/int32/uint8 PCM "
            "(int64 is not assumed to be any PCM width; convert it, e.g. .astype(np.int16))",
        )
    return _Decoded(data=np.ascontiguousarray(data), sample_rate=rate, decoder="array")


# ---------------------------------------------------------------------------------------------
# Checks, mix-down and resampling shared by all sources.


def _finish(decoded: _Decoded, label: str, max_seconds: float | None, channel: str) -> Audio:
    data, rate = decoded.data, decoded.sample_rate  # [S, C] float32
    num_frames, num_channels = data.shape
    if num_frames == 0:
        _fail(label, f"has no samples ({num_channels} channel(s) at {rate} Hz, 0 frames)")
    duration = num_frames / rate
    if max_seconds is not None and duration > max_seconds:
        _too_long(label, f"is {duration:.1f} s long", max_seconds)

    finite = np.isfinite(data)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        first_frame, first_channel = (int(i) for i in np.argwhere(~finite)[0])
        _fail(
            label,
            f"contains {bad} non-finite sample(s) (NaN or inf), the first at {first_frame / rate:.3f} s "
            f"(frame {first_frame}, channel {first_channel})",
        )
    peak = float(np.abs(data).max())
    if peak > 1.0:  # only float input can get here: integer PCM is scaled into [-1, 1)
        logger.warning(
            "%s: peak amplitude %.3f is above 1.0; samples are kept as they are (not clipped)", label, peak
        )

    mono = np.ascontiguousarray(_MIXDOWN[channel](data), dtype=np.float32)  # [S]
    if rate != TARGET_SAMPLE_RATE:
        mono = np.ascontiguousarray(soxr.resample(mono, rate, TARGET_SAMPLE_RATE, quality=RESAMPLE_QUALITY))
    mono = mono.astype(np.float32, copy=False)
    logger.debug(
        "loaded %s via %s: %d Hz x %d channel(s), %.2f s -> %d samples at %d Hz",
        label, decoded.decoder, rate, num_channels, duration, mono.shape[0], TARGET_SAMPLE_RATE,
    )  # fmt: skip
    return Audio(
        samples=mono,
        sample_rate=TARGET_SAMPLE_RATE,
        source=label,
        original_sample_rate=rate,
        original_channels=num_channels,
    )


def _check_sample_rate(rate: int, label: str) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        _fail(label, f"sample rate {rate} Hz is outside the accepted {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")


def _refuse_sample_rate(sample_rate: int | None, label: str) -> None:
    if sample_rate is not None:
        _fail(label, "sample_rate= is only for arrays; files and bytes carry their own rate")


def _too_long(label: str, what: str, max_seconds: float | None) -> NoReturn:
    _fail(
        label,
        f"{what}, over the limit of max_seconds={max_seconds:g} s (audio is never truncated); "
        "pass a larger max_seconds, or max_seconds=None for no limit, or cut the audio first",
    )


def _fail(label: str, problem: str) -> NoReturn:
    """Raise the one-line AudioInputError for ``label``."""
    raise AudioInputError(f"audio {label}: {problem}")


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _is_torch_tensor(x: object) -> bool:
    torch = sys.modules.get("torch")  # no import: a caller with a tensor has already imported torch
    return torch is not None and isinstance(x, torch.Tensor)


def _tensor_to_numpy(x: Any) -> np.ndarray:
    torch = sys.modules["torch"]
    tensor = x.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def _sndfile_reason(e: BaseException) -> str:
    return _one_line(getattr(e, "error_string", None) or str(e)).rstrip(".")


def _one_line(text: str, limit: int = 200) -> str:
    """Last non-empty line of a tool's message, whitespace collapsed, at most ``limit`` chars."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= limit else last[: limit - 3] + "..."


def _display(name: str) -> str:
    """A name safe for one-line messages (control characters, e.g. in uploaded names, escaped)."""
    return name if name.isprintable() else repr(name)
