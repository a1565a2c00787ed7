"""``make demo``'s example clips: all shipped in assets/examples, each with its source and questions."""

from __future__ import annotations

import json

from omnivox.agent import demo
from omnivox.agent.audio import load_audio


def test_examples_include_the_shipped_jfk_clip() -> None:
    examples = demo._examples()
    paths = [path for path, _, _ in examples]
    assert paths[0] == demo.EXAMPLES / "jfk.flac"  # the real recording first, never skipped
    assert all(path.parent == demo.EXAMPLES and path.is_file() for path in paths), paths

    _, questions, source = examples[0]
    assert questions == ["Transcribe the speech."] and source["instruction"] == questions[0]
    assert source["answer"].startswith("And so my fellow Americans, ask not what your country can do for you")
    assert "public domain" in source["license"] and "openai/whisper" in source["source"]
    assert load_audio(paths[0]).duration == source["duration"] == 11.0


def test_every_clip_has_a_source_entry() -> None:
    sources = json.loads((demo.EXAMPLES / "sources.json").read_text())
    assert [path.name for path, _, _ in demo._examples()] == list(sources)
    assert all(entry["answer"] and entry["instruction"] for entry in sources.values())


def test_the_demo_speaks_its_first_answer_and_whisper_reads_it(tiny_model_dir, tmp_path, capsys) -> None:
    import tiny

    folder = tiny.add_speech_head(tiny.greedy_copy(tiny_model_dir, tmp_path, max_new_tokens=6, name="speaks"))
    out = tmp_path / "answer.wav"
    assert demo.main(["--model", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Whisper tiny.en hears:" in printed and "voice kokoro:jf_tiny" in printed
    assert load_audio(out).duration > 0
