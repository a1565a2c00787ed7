"""Tests of omnivox.agent.audio: real file formats written here, every rejection, split_windows."""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnivox.agent.audio import (
    TARGET_SAMPLE_RATE,
    Audio,
    base64_bytes,
    data_url_bytes,
    load_audio,
    split_windows,
)
from omnivox.encoders.base import SAMPLE_RATE
from omnivox.errors import AudioInputError, UserInputError

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg is not installed (apt-get install ffmpeg)")

FREQ = 440.0
AMP = 0.5
SECONDS = 1.0


def sine(rate: int, seconds: float = SECONDS, freq: float = FREQ, amp: float = AMP) -> np.ndarray:
    """[S] float64 sine."""
    t = np.arange(round(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def band_energy(x: np.ndarray, rate: int, freq: float, width: float = 20.0) -> float:
    """Fraction of the signal's energy within ``width`` Hz of ``freq``."""
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(power[np.abs(freqs - freq) < width].sum() / power.sum())


def assert_is_sine(
    audio: Audio, *, seconds: float = SECONDS, freq: float = FREQ, amp: float = AMP, lossless: bool = True
) -> None:
    """16 kHz mono float32 sine of the expected length, frequency and energy.

    Lossless inputs must match the reference sample by sample (length within 1 sample);
    lossy codecs (ogg, mp3, aac) within 1 % on length and energy.
    """
    x = audio.samples
    expected_len = round(seconds * TARGET_SAMPLE_RATE)
    assert audio.sample_rate == TARGET_SAMPLE_RATE
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - expected_len) <= (1 if lossless else 0.01 * expected_len), (len(x), expected_len)
    assert abs(dominant_frequency(x, TARGET_SAMPLE_RATE) - freq) <= 2.0
    rms = float(np.sqrt(np.mean(x[200:-200].astype(np.float64) ** 2)))
    assert rms == pytest.approx(amp / np.sqrt(2), rel=0.01)
    if lossless:
        ref = sine(TARGET_SAMPLE_RATE, seconds, freq, amp)
        n = min(len(ref), len(x))
        # The resampler's filter rings at the edges; the middle must match the ideal sine.
        np.testing.assert_allclose(x[100 : n - 100], ref[100 : n - 100], atol=2e-3)


def write(path: Path, data: np.ndarray, rate: int, **kwargs: str) -> Path:
    sf.write(path, data, rate, **kwargs)
    return path


def ffmpeg_encode(src: Path, dst: Path, *args: str) -> Path:
    assert FFMPEG is not None
    subprocess.run(
        [FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-i", str(src), *args, str(dst)], check=True
    )
    return dst


def stereo_440_1000(rate: int) -> np.ndarray:
    """[S, 2]: channel 0 a 440 Hz sine, channel 1 a 1000 Hz sine."""
    return np.stack([sine(rate), sine(rate, freq=1000.0)], axis=1)


# ---------------------------------------------------------------------------------------------
# Formats


def test_target_rate_matches_encoders() -> None:
    assert TARGET_SAMPLE_RATE == SAMPLE_RATE


def test_int16_wav_44k_stereo_takes_channel_0(tmp_path: Path) -> None:
    path = write(tmp_path / "a.wav", stereo_440_1000(44_100), 44_100, subtype="PCM_16")
    audio = load_audio(path)
    assert_is_sine(audio)
    assert band_energy(audio.samples, TARGET_SAMPLE_RATE, 1000.0) < 1e-4  # channel 1 left out
    assert (audio.original_sample_rate, audio.original_channels, audio.source) == (44_100, 2, str(path))
    assert audio.duration == pytest.approx(SECONDS, abs=1 / TARGET_SAMPLE_RATE)


def test_channel_mean_averages(tmp_path: Path) -> None:
    path = write(tmp_path / "a.wav", stereo_440_1000(44_100), 44_100, subtype="PCM_16")
    x = load_audio(path, channel="mean").samples
    ref = (sine(TARGET_SAMPLE_RATE) + sine(TARGET_SAMPLE_RATE, freq=1000.0)) / 2
    np.testing.assert_allclose(x[100:-100], ref[100:-100], atol=2e-3)


def test_int16_is_scaled_exactly(tmp_path: Path) -> None:
    pcm = np.array([-32768, -16384, 0, 16384, 32767] * 400, dtype=np.int16)
    path = write(tmp_path / "a.wav", pcm, TARGET_SAMPLE_RATE, subtype="PCM_16")
    expected = pcm.astype(np.float32) / 32768
    # 16 kHz input is not resampled: bit-exact.
    np.testing.assert_array_equal(load_audio(path).samples, expected)
    np.testing.assert_array_equal(load_audio(pcm, sample_rate=TARGET_SAMPLE_RATE).samples, expected)


def test_float_wav_8k(tmp_path: Path) -> None:
    path = write(tmp_path / "a.wav", sine(8_000).astype(np.float32), 8_000, subtype="FLOAT")
    audio = load_audio(path)
    assert_is_sine(audio)
    assert (audio.original_sample_rate, audio.original_channels) == (8_000, 1)


def test_flac_24bit(tmp_path: Path) -> None:
    path = write(tmp_path / "a.flac", sine(22_050), 22_050, subtype="PCM_24")
    audio = load_audio(path)
    assert_is_sine(audio)
    assert audio.original_sample_rate == 22_050


def test_ogg_vorbis(tmp_path: Path) -> None:
    path = write(tmp_path / "a.ogg", sine(48_000), 48_000, format="OGG", subtype="VORBIS")
    assert_is_sine(load_audio(path), lossless=False)


def test_mp3(tmp_path: Path) -> None:
    if "MP3" in sf.available_formats():
        path = write(tmp_path / "a.mp3", sine(44_100), 44_100, format="MP3", subtype="MPEG_LAYER_III")
    elif FFMPEG is not None:
        wav = write(tmp_path / "a.wav", sine(44_100), 44_100)
        path = ffmpeg_encode(wav, tmp_path / "a.mp3", "-b:a", "128k")
    else:
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} cannot write MP3 and ffmpeg is not installed")
    assert_is_sine(load_audio(path), lossless=False)


@needs_ffmpeg
@pytest.mark.parametrize("suffix, args", [(".m4a", ("-c:a", "aac")), (".webm", ("-c:a", "libopus"))])
def test_ffmpeg_fallback(tmp_path: Path, suffix: str, args: tuple[str, ...]) -> None:
    wav = write(tmp_path / "a.wav", stereo_440_1000(48_000), 48_000)
    path = ffmpeg_encode(wav, tmp_path / f"a{suffix}", *args)
    with pytest.raises(sf.SoundFileError):
        sf.info(path)  # really the ffmpeg path
    for audio in (load_audio(path), load_audio(path.read_bytes())):
        # AAC adds encoder delay/padding of ~1024-2048 samples at 48 kHz: length within 5 %.
        assert abs(audio.duration - SECONDS) < 0.05
        assert abs(dominant_frequency(audio.samples, TARGET_SAMPLE_RATE) - FREQ) <= 2.0
        assert band_energy(audio.samples, TARGET_SAMPLE_RATE, 1000.0) < 1e-3  # channel 0 only
        assert (audio.original_sample_rate, audio.original_channels) == (48_000, 2)


def test_bytes_input(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    sf.write(buffer, sine(44_100), 44_100, format="WAV", subtype="PCM_16")
    audio = load_audio(buffer.getvalue())
    assert_is_sine(audio)
    assert audio.source == "<bytes>"
    assert load_audio(bytearray(buffer.getvalue()), name="upload.wav").source == "upload.wav"


def test_array_inputs_channel_0() -> None:
    cs = stereo_440_1000(24_000).T.astype(np.float32)  # [C, S]
    for array in (cs, cs.T, torch.from_numpy(cs), torch.from_numpy(cs.T.copy()).to(torch.bfloat16)):
        audio = load_audio(array, sample_rate=24_000)
        assert_is_sine(audio, lossless=array.dtype != torch.bfloat16)
        assert (audio.original_sample_rate, audio.original_channels, audio.source) == (24_000, 2, "<array>")
    mono = load_audio(sine(24_000), sample_rate=24_000)
    assert_is_sine(mono)
    assert mono.original_channels == 1


def test_array_is_not_aliased() -> None:
    x = sine(TARGET_SAMPLE_RATE).astype(np.float32)
    audio = load_audio(x, sample_rate=TARGET_SAMPLE_RATE)
    x[:] = 0
    assert np.abs(audio.samples).max() > 0.4


def test_int16_tensor_is_scaled() -> None:
    pcm = torch.tensor([[-32768, 0, 16384] * 100] * 2, dtype=torch.int16)  # [C, S]
    samples = load_audio(pcm, sample_rate=TARGET_SAMPLE_RATE).samples
    np.testing.assert_array_equal(samples[:3], np.array([-1.0, 0.0, 0.5], dtype=np.float32))


def test_loud_float_is_kept_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    x = np.full(TARGET_SAMPLE_RATE, 0.1, dtype=np.float32)
    x[100] = 1.5
    with caplog.at_level(logging.WARNING, logger="omnivox.agent.audio"):
        audio = load_audio(x, sample_rate=TARGET_SAMPLE_RATE, name="loud")
    assert audio.samples.max() == pytest.approx(1.5)  # not clipped
    assert any("loud" in r.message and "1.500" in r.message for r in caplog.records)


def test_truncated_wav_is_read_and_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = write(tmp_path / "full.wav", sine(TARGET_SAMPLE_RATE), TARGET_SAMPLE_RATE, subtype="PCM_16")
    data = full.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[:-1001])  # 16000 frames declared, 500.5 frames' bytes missing
    reference, _ = sf.read(full, dtype="float32")
    with caplog.at_level(logging.WARNING, logger="omnivox.agent.audio"):
        audio = load_audio(cut)
    np.testing.assert_array_equal(audio.samples, reference[:15499])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert all(
        f in warnings[0] for f in ("cut.wav", "truncated", "declares 16000 frames", "only 15499 frames")
    )

    # Float WAV (fact and PEAK chunks before 'data'), stereo, 44.1 kHz, as bytes.
    caplog.clear()
    buffer = io.BytesIO()
    sf.write(buffer, stereo_440_1000(44_100), 44_100, format="WAV", subtype="FLOAT")
    with caplog.at_level(logging.WARNING, logger="omnivox.agent.audio"):
        load_audio(buffer.getvalue()[: -8 * 100], name="upload.wav")  # 100 frames short
    assert [r.getMessage() for r in caplog.records] == [
        "upload.wav: truncated file: its header declares 44100 frames (1.00 s), only 44000 frames (1.00 s) "
        "could be read; using those"
    ]

    caplog.clear()
    streamed = bytearray(data)  # as ffmpeg writes WAV on a pipe: "length unknown"
    size_at = data.index(b"data") + 4
    streamed[size_at : size_at + 4] = b"\xff\xff\xff\xff"
    with caplog.at_level(logging.WARNING, logger="omnivox.agent.audio"):
        load_audio(full)
        load_audio(buffer.getvalue())
        assert load_audio(bytes(streamed)).num_samples == TARGET_SAMPLE_RATE
    assert caplog.records == []  # complete files: no warning


def test_native_decoder_notes_stay_off_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # libsndfile's mpg123 prints "Note: Illegal Audio-MPEG-Header ..." to C's stderr for these bytes.
    noise = tmp_path / "noise.mp3"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with caplog.at_level(logging.INFO, logger="omnivox.agent.audio"):
        rejects(["noise.mp3", "cannot decode"], noise)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    said = [r.getMessage() for r in caplog.records if "the decoder said" in r.getMessage()]
    assert len(said) == 1 and "noise.mp3" in said[0] and "Illegal Audio-MPEG-Header" in said[0]
    print("stderr works again", file=sys.stderr)
    os.write(2, b"fd 2 works again\n")
    assert capfd.readouterr().err == "stderr works again\nfd 2 works again\n"


# ---------------------------------------------------------------------------------------------
# Rejections: each an AudioInputError naming the input and the problem on one line.


def rejects(fragments: list[str], *args: object, **kwargs: object) -> AudioInputError:
    with pytest.raises(AudioInputError) as info:
        load_audio(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return info.value


def test_rejects_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    error = rejects([str(path), "file not found"], path)
    assert isinstance(error, UserInputError) and isinstance(error, ValueError)


def test_rejects_directory(tmp_path: Path) -> None:
    rejects([str(tmp_path), "is a directory"], tmp_path)


def test_rejects_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    rejects([str(fifo), "not a regular file"], fifo)


def test_rejects_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").touch()
    rejects(["empty.wav", "empty (0 bytes)"], tmp_path / "empty.wav")
    rejects(["<bytes>", "empty (0 bytes)"], b"")


def test_rejects_zero_samples(tmp_path: Path) -> None:
    path = write(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32), TARGET_SAMPLE_RATE)
    rejects(["zero.wav", "has no samples"], path)
    rejects(["<array>", "has no samples"], np.zeros(0, dtype=np.float32), sample_rate=TARGET_SAMPLE_RATE)
    rejects(["<array>", "has no samples"], np.zeros((2, 0), dtype=np.float32), sample_rate=TARGET_SAMPLE_RATE)


def test_rejects_corrupt(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 50)
    rejects(["notes.wav", "cannot decode"], text)

    buffer = io.BytesIO()
    sf.write(buffer, sine(TARGET_SAMPLE_RATE), TARGET_SAMPLE_RATE, format="WAV", subtype="PCM_16")
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(buffer.getvalue()[:30])  # cut inside the header
    rejects(["truncated.wav", "cannot decode"], truncated)
    rejects(["<bytes>", "cannot decode"], np.random.default_rng(0).bytes(4096))


def test_rejects_undecodable_without_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg on PATH
    rejects(["<bytes>", "ffmpeg", "not installed", "Format not recognised"], b"\x00\x00\x00\x20ftypM4A " * 10)


@needs_ffmpeg
def test_ffmpeg_refuses_playlists(tmp_path: Path) -> None:
    """A playlist would make ffmpeg read other files; only plain containers are decoded."""
    target = write(tmp_path / "secret.wav", sine(TARGET_SAMPLE_RATE), TARGET_SAMPLE_RATE)
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{target}\n#EXT-X-ENDLIST\n")
    rejects(["list.m3u8", "cannot decode"], playlist)
    concat = tmp_path / "list.txt"
    concat.write_text(f"ffconcat version 1.0\nfile '{target}'\n")
    rejects(["list.txt", "cannot decode"], concat)


def test_rejects_non_finite(tmp_path: Path) -> None:
    x = sine(TARGET_SAMPLE_RATE).astype(np.float32)
    x[1600] = np.nan
    path = write(tmp_path / "nan.wav", x, TARGET_SAMPLE_RATE, subtype="FLOAT")
    rejects(["nan.wav", "1 non-finite", "0.100 s"], path)
    stereo = np.zeros((2, 1000), dtype=np.float32)
    stereo[1, 10:12] = np.inf  # even in a channel that the mix-down would drop
    rejects(["<array>", "2 non-finite", "channel 1"], stereo, sample_rate=TARGET_SAMPLE_RATE)


def test_rejects_too_long(tmp_path: Path) -> None:
    x = sine(TARGET_SAMPLE_RATE, seconds=2.5)
    fragments = ["2.5 s", "max_seconds=1 s", "max_seconds=None", "never truncated"]
    rejects(["<array>", *fragments], x, sample_rate=TARGET_SAMPLE_RATE, max_seconds=1.0)
    path = write(tmp_path / "long.flac", x, TARGET_SAMPLE_RATE)
    rejects(["long.flac", *fragments], path, max_seconds=1.0)
    assert load_audio(path, max_seconds=None).duration == pytest.approx(2.5)
    assert load_audio(path, max_seconds=2.5).duration == pytest.approx(2.5)  # the limit itself is allowed


@needs_ffmpeg
def test_rejects_too_long_via_ffmpeg(tmp_path: Path) -> None:
    wav = write(tmp_path / "a.wav", sine(TARGET_SAMPLE_RATE, seconds=3.0), TARGET_SAMPLE_RATE)
    m4a = ffmpeg_encode(wav, tmp_path / "long.m4a", "-c:a", "aac")
    rejects(["long.m4a", "longer than 1.0 s", "max_seconds=1 s"], m4a, max_seconds=1.0)


@pytest.mark.parametrize("rate", [500, 999, 384_001, 1_000_000])
def test_rejects_absurd_sample_rates(tmp_path: Path, rate: int) -> None:
    rejects(["<array>", f"sample rate {rate} Hz", "1000..384000"], np.zeros(2000), sample_rate=rate)
    path = write(tmp_path / "odd.wav", np.zeros(2000, dtype=np.float32), rate)
    rejects(["odd.wav", f"sample rate {rate} Hz"], path)


def test_accepts_edge_sample_rates() -> None:
    for rate in (1_000, 384_000):
        assert load_audio(sine(rate), sample_rate=rate).num_samples == pytest.approx(
            TARGET_SAMPLE_RATE, abs=1
        )


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.zeros((2, 2, 1000)), "got shape (2, 2, 1000)"),
        (np.array(0.5), "got shape ()"),
        (np.zeros((2, 30)), "cannot tell the channel axis of shape (2, 30)"),
        (np.zeros((100, 200)), "cannot tell the channel axis of shape (100, 200)"),
        (np.zeros(1000, dtype=np.int64), "unsupported sample dtype int64"),
        (np.zeros(1000, dtype=np.complex64), "unsupported sample dtype complex64"),
        (torch.zeros(1, 2, 1000), "got shape (1, 2, 1000)"),
    ],
)
def test_rejects_bad_arrays(array: object, fragment: str) -> None:
    rejects(["<array>", fragment], array, sample_rate=TARGET_SAMPLE_RATE)


def test_rejects_bad_sample_rate_arguments(tmp_path: Path) -> None:
    rejects(["<array>", "sample_rate= is required"], np.zeros(1000))
    rejects(["<array>", "whole number"], np.zeros(1000), sample_rate=16000.5)
    path = write(tmp_path / "a.wav", np.zeros(1000), TARGET_SAMPLE_RATE)
    rejects(["a.wav", "only for arrays"], path, sample_rate=TARGET_SAMPLE_RATE)


def test_name_is_one_line() -> None:
    rejects(["'evil\\nname'"], b"", name="evil\nname")


def test_invalid_arguments() -> None:
    with pytest.raises(TypeError, match="got list"):
        load_audio([0.0] * 100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channel must be one of"):
        load_audio(np.zeros(100), sample_rate=TARGET_SAMPLE_RATE, channel="left")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_seconds must be a positive number"):
        load_audio(np.zeros(100), sample_rate=TARGET_SAMPLE_RATE, max_seconds=0)


# ---------------------------------------------------------------------------------------------
# split_windows


@pytest.mark.parametrize(
    "num_samples, window, overlap, expected",
    [
        (12, 4, 0, [(0, 4), (4, 8), (8, 12)]),  # exact multiple: no empty tail window
        (13, 4, 0, [(0, 4), (4, 8), (8, 12), (12, 13)]),  # last window shorter
        (3, 4, 1, [(0, 3)]),  # shorter than one window
        (4, 4, 1, [(0, 4)]),  # exactly one window
        (10, 4, 1, [(0, 4), (3, 7), (6, 10)]),
        (11, 4, 2, [(0, 4), (2, 6), (4, 8), (6, 10), (8, 11)]),
        (0, 4, 1, []),
    ],
)
def test_split_windows(num_samples: int, window: int, overlap: int, expected: list[tuple[int, int]]) -> None:
    assert split_windows(num_samples, window, overlap) == expected


def test_split_windows_covers_in_order() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        window = int(rng.integers(1, 50))
        overlap = int(rng.integers(0, window))
        n = int(rng.integers(1, 500))
        windows = split_windows(n, window, overlap)
        assert windows[0][0] == 0 and windows[-1][1] == n
        assert all(end - start == window for start, end in windows[:-1])
        assert 0 < windows[-1][1] - windows[-1][0] <= window
        for (s0, e0), (s1, e1) in zip(windows, windows[1:], strict=False):
            assert s1 - s0 == window - overlap and e1 > e0  # in order, each adds new samples


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((10, 4, 4), "overlap=4, window=4"),
        ((10, 4, 5), "overlap=5, window=4"),
        ((10, 4, -1), "overlap=-1"),
        ((10, 0, 0), "window must be > 0"),
        ((-1, 4, 0), "num_samples must be >= 0"),
    ],
)
def test_split_windows_rejects(args: tuple[int, int, int], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        split_windows(*args)


# ---------------------------------------------------------------------------------------------
# base64 and data URLs


def test_base64_bytes_decodes_and_ignores_line_breaks() -> None:
    raw = bytes(range(256)) * 3
    text = base64.b64encode(raw).decode()
    assert base64_bytes(text, "audio_base64") == raw
    assert base64_bytes(" " + "\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\n", "x") == raw


@pytest.mark.parametrize(
    "data, max_chars, fragment",
    [
        ("", None, "non-empty base64 string, got an empty string"),
        (" \n", None, "non-empty base64 string"),
        (None, None, "non-empty base64 string, got NoneType"),
        (b"AAAA", None, "got bytes"),
        ("@@not base64@@", None, "not valid base64"),
        ("AAA", None, "not valid base64"),  # bad padding
        ("\u00e9" * 8, None, "not valid base64"),  # not ASCII
        ("====", None, "not valid base64"),
        ("AAAAAAAA", 4, "8 base64 characters, more than the 4 taken"),
    ],
)
def test_base64_bytes_rejects(data: object, max_chars: int | None, fragment: str) -> None:
    with pytest.raises(AudioInputError, match=r"^messages\[0\]\.data: .*" + re.escape(fragment)):
        base64_bytes(data, "messages[0].data", max_chars)


def test_data_url_bytes_gives_bytes_and_mime_type() -> None:
    raw = b"RIFF....WAVE"
    data = base64.b64encode(raw).decode()
    assert data_url_bytes(f"data:audio/wav;base64,{data}", "url") == (raw, "audio/wav")
    assert data_url_bytes(f" DATA:audio/x-wav;codecs=1;BASE64,{data}\n", "url") == (raw, "audio/x-wav")
    assert data_url_bytes(f"data:;base64,{data}", "url") == (raw, None)


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("https://example.com/a.wav", "nothing is downloaded, got 'https://example.com/a.wav'"),
        ("file:///etc/passwd", "audio URLs must be data URLs"),
        ("/etc/passwd", "nothing is downloaded"),
        (12, "must be a string, got int"),
        ("data:audio/wav,AAAA", "must be a base64 data URL, data:<type>;base64,<data>"),
        ("data:audio/wav;base64", "must be a base64 data URL"),  # no comma
        ("data:audio/wav;base64,", "non-empty base64 string"),
        ("data:audio/wav;base64,@@", "not valid base64"),
    ],
)
def test_data_url_bytes_rejects(url: object, fragment: str) -> None:
    with pytest.raises(UserInputError, match=f"^audio_url: .*{re.escape(fragment)}"):
        data_url_bytes(url, "audio_url")


def test_data_url_bytes_limits_the_base64_length() -> None:
    with pytest.raises(AudioInputError, match="12 base64 characters, more than the 8 taken"):
        data_url_bytes("data:audio/wav;base64,AAAAAAAAAAAA", "audio", max_chars=8)


# ---------------------------------------------------------------------------------------------
# Real speech


def test_speech_fixtures(speech_fixtures: dict[Path, str]) -> None:
    assert speech_fixtures
    for path in speech_fixtures:
        info = sf.info(path)
        audio = load_audio(path)
        assert audio.sample_rate == TARGET_SAMPLE_RATE
        assert (audio.original_sample_rate, audio.original_channels) == (info.samplerate, info.channels)
        assert abs(audio.num_samples - info.duration * TARGET_SAMPLE_RATE) <= 1
        assert np.isfinite(audio.samples).all()
        rms = float(np.sqrt(np.mean(audio.samples.astype(np.float64) ** 2)))
        assert 1e-3 < rms < 0.5, (path.name, rms)  # speech, not silence or noise at full scale
        if info.samplerate == TARGET_SAMPLE_RATE and info.channels == 1:
            np.testing.assert_array_equal(audio.samples, sf.read(path, dtype="float32")[0])
