"""The agent loop against a scripted model, the workspace's path rules, and the built-in tools on real signals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tiny

from omnivox.agent.agent_loop import Agent
from omnivox.agent.builtin_tools import builtin_tools, measure_audio, speech_segments
from omnivox.agent.generation import Generation, GenerationSettings
from omnivox.agent.tools import ToolCall, ToolError, ToolRegistry, tool
from omnivox.agent.workspace import Workspace
from omnivox.errors import UserInputError

JFK = Path(__file__).resolve().parents[2] / "assets" / "examples" / "jfk.flac"


class ScriptedAssistant:
    """Answers from a script (a list of Generations) and records what it was asked."""

    speech_tasks: tuple[str, ...] = ()  # no speech head unless a test gives it one (speech, speech_tasks)

    def __init__(self, script: list[Generation]) -> None:
        self.script = list(script)
        self.asked: list[dict] = []

    def settings(self, **overrides) -> GenerationSettings:
        return GenerationSettings.greedy(**overrides)

    def encode_clip(self, samples):
        return samples

    def generate(self, conversations, audio, settings=None, on_text=None, **answer_format):
        self.asked.append({"messages": list(conversations[0]), **answer_format})
        return [self.script.pop(0)]

    def chat(self, prompt, audio=(), settings=None, on_text=None, **kw):
        return Generation(f"heard {len(audio)} clip(s): {prompt}", [], "stop")


def calls(*pairs) -> Generation:
    return Generation("", [], "tool_calls", tool_calls=[ToolCall(n, a) for n, a in pairs])


def answer(text: str) -> Generation:
    return Generation(text, [], "stop")


def test_call_run_observe_answer(tmp_path):
    ws = Workspace(tmp_path)
    model = ScriptedAssistant([calls(("trim", {"clip": "clip-1", "start": 0.0, "end": 0.5})),
                               calls(("measure", {"clip": "audio-1"})), answer("It is 0.5 s long.")])  # fmt: skip
    agent = Agent(model, builtin_tools(model, ws), ws)
    steps = []
    result = agent.run("Cut the first half second and measure it.", [tiny.tone_clip(1.0)], on_step=steps.append)
    assert result.answer == "It is 0.5 s long." and result.stopped_by == "answer"
    assert [s.kind for s in result.steps] == ["call", "call", "answer"] and steps == result.steps
    assert result.steps[0].result == "audio-1: 0.50 s, 16000 Hz" and result.steps[0].artifacts == ["audio-1"]
    assert json.loads(result.steps[1].result)["duration"] == 0.5
    written = Path(result.artifacts["audio-1"])
    assert written.parent == tmp_path.resolve() and sf.info(str(written)).frames == 8000
    # the model saw its calls and the results in order, the tools offered each time
    last = model.asked[-1]["messages"]
    assert [m.role for m in last] == ["user", "assistant", "tool", "assistant", "tool"]
    assert json.loads(last[2].text) == {"name": "trim", "content": "audio-1: 0.50 s, 16000 Hz"}
    assert model.asked[0]["tool_choice"] == "auto" and {t.name for t in model.asked[0]["tools"]} >= {"trim", "measure"}
    trace = json.loads(result.trace_json())
    assert trace["steps"][0]["name"] == "trim" and trace["artifacts"] == {"audio-1": str(written)}


def test_tool_errors_go_back_as_text_or_raise(tmp_path):
    ws = Workspace(tmp_path)
    script = [calls(("trim", {"clip": "clip-9", "start": 0, "end": 1}), ("trim", {"clip": "clip-1", "start": 2, "end": 1})),
              answer("Sorry.")]  # fmt: skip
    model = ScriptedAssistant(script)
    result = Agent(model, builtin_tools(model, ws), ws).run("x", [tiny.tone_clip(1.0)])
    first, second = result.steps[:2]
    assert not first.ok and first.result == "error: no audio called 'clip-9'; the workspace holds: clip-1"
    assert not second.ok and "need 0 <= start < end" in second.result
    assert json.loads(model.asked[-1]["messages"][-1].text)["content"].startswith("error:")
    model = ScriptedAssistant([calls(("trim", {"clip": "clip-9", "start": 0, "end": 1}))])
    with pytest.raises(UserInputError, match="clip-9"):
        Agent(model, builtin_tools(model, ws), ws, raise_on_tool_error=True).run("x", [tiny.tone_clip(1.0)])
    model = ScriptedAssistant([calls(("nope", {}))])
    with pytest.raises(ToolError, match="no tool named 'nope'"):
        Agent(model, builtin_tools(model, ws), ws, raise_on_tool_error=True).run("x", [tiny.tone_clip(1.0)])


def test_the_step_budget_forces_an_answer(tmp_path):
    ws = Workspace(tmp_path)
    model = ScriptedAssistant([calls(("measure", {"clip": "clip-1"}))] * 2 + [answer("Done.")])
    result = Agent(model, builtin_tools(model, ws), ws, max_steps=2).run("Measure forever.", [tiny.tone_clip(1.0)])
    assert result.stopped_by == "max_steps" and result.answer == "Done."
    assert model.asked[-1]["tool_choice"] == "none"
    with pytest.raises(UserInputError, match="max_steps"):
        Agent(model, ToolRegistry(), ws, max_steps=0)


def test_a_real_tiny_model_runs_the_loop(tiny_model_dir, tmp_path):
    """A random-weight model, forced to call, still makes calls the tools accept or reject cleanly."""
    from omnivox.agent.assistant import Assistant

    assistant = Assistant.from_pretrained(tiny_model_dir, transcriber=False)
    ws = Workspace(tmp_path)

    @tool
    def loudness(clip: str) -> str:
        """Loudness of a clip.

        Args:
            clip: the clip's id.
        """
        return json.dumps(measure_audio(ws.get(clip).samples, 16000))

    agent = Agent(assistant, ToolRegistry([loudness]), ws, max_steps=1, settings=assistant.settings(num_beams=1, max_new_tokens=24))
    result = agent.run("How loud?", [tiny.tone_clip(1.0)])
    assert result.steps[-1].kind == "answer" and isinstance(result.answer, str)


def test_workspace_paths_stay_inside(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    sf.write(root / "a.wav", tiny.tone_clip(0.5), 16000)
    outside = tmp_path / "secret.wav"
    sf.write(outside, tiny.tone_clip(0.5), 16000)
    os.symlink(outside, root / "link.wav")
    ws = Workspace(root)
    assert ws.add_file("a.wav") == "clip-1" and ws.add_file(str(root / "a.wav")) == "clip-2"
    for bad, message in [("../secret.wav", "'..'"), (str(outside), "outside the allowed directory"),
                         ("link.wav", "outside the allowed directory"), ("missing.wav", "no file"), ("", "empty")]:  # fmt: skip
        with pytest.raises(UserInputError, match=message):
            ws.add_file(bad)
    assert ws.get("<GENERATED>-clip-1").id == "clip-1"
    with pytest.raises(UserInputError, match="holds: clip-1, clip-2"):
        ws.get("/etc/passwd")
    with pytest.raises(UserInputError, match="does not exist"):
        Workspace(tmp_path / "nope")
    small = Workspace(root, max_items=2)
    ids = [small.add_clip(tiny.tone_clip(0.1)) for _ in range(3)]
    assert small.ids == ids[1:]
    with pytest.raises(UserInputError, match="clip-1 was dropped from memory"):
        small.get("clip-1")
    small.forget("clip-2")
    assert small.ids == ["clip-3"]


def test_builtin_tools_on_real_signals(tmp_path):
    from omnivox.agent.audio import load_audio

    ws = Workspace(tmp_path)
    model = ScriptedAssistant([])
    tools = builtin_tools(model, ws)
    speech = load_audio(JFK).samples
    clip = ws.add_clip(np.concatenate([np.zeros(16000, np.float32), speech[: 16000 * 4]]))
    tone = ws.add_clip(tiny.tone_clip(2.0, sample_rate=16000) * 0.5)
    segments = json.loads(tools.get("detect_speech").run({"clip": clip}).text)
    assert segments and 0.8 <= segments[0]["start"] <= 1.6 and segments[-1]["end"] <= 5.05
    assert tools.get("detect_speech").run({"clip": tone}).text == "no speech"
    assert speech_segments(np.zeros(32000, np.float32)) == []
    m = json.loads(tools.get("measure").run({"clip": tone}).text)
    assert m["duration"] == 2.0 and m["sample_rate"] == 16000 and abs(m["peak_dbfs"] - 20 * np.log10(0.5 * np.abs(tiny.tone_clip(2.0)).max())) < 0.1
    assert measure_audio(np.zeros(100, np.float32), 16000)["loudness_lufs"] is None
    out = tools.get("convert").run({"clip": tone, "sample_rate": 8000, "format": "flac"})
    made = ws.get(out.artifacts[0])
    assert out.text == "audio-1: 2.00 s, 8000 Hz, flac" and made.path.suffix == ".flac" and sf.info(str(made.path)).samplerate == 8000
    assert made.for_model().shape[0] == 32000
    mixed = ws.get(tools.get("mix").run({"clip": tone, "other": "audio-1", "offset": 1.0, "other_gain_db": -6}).artifacts[0])
    assert mixed.sample_rate == 16000 and abs(mixed.duration - 3.0) < 1e-3 and np.abs(mixed.samples).max() <= 1.0
    assert "heard 1 clip(s): What?" == tools.get("ask").run({"clip": clip, "question": "What?"}).text
    with pytest.raises(UserInputError, match="clip"):
        tools.get("trim").run({"clip": "../../x", "start": 0, "end": 1})
    with pytest.raises(ToolError, match="past the end"):
        tools.get("trim").run({"clip": tone, "start": 5, "end": 6})


def test_speech_tools_are_offered_when_the_speech_head_does_them_and_make_new_audio(tmp_path):
    from omnivox.decoders.speech import SpeechHead

    ws = Workspace(tmp_path)
    assert not {"speak", "remove_noise"} & set(builtin_tools(ScriptedAssistant([]), ws).names)
    tts_only = ScriptedAssistant([])
    tts_only.speech = SpeechHead.from_folder(tiny.add_speech_head(tmp_path / "tts"))
    tts_only.speech_tasks = tuple(tts_only.speech.tasks)
    assert "speak" in builtin_tools(tts_only, ws).names and "remove_noise" not in builtin_tools(tts_only, ws).names

    head = SpeechHead.from_folder(tiny.add_speech_head(tmp_path / "ns", tasks={"tts": 0, "ns": 1}))
    model = ScriptedAssistant([calls(("remove_noise", {"clip": "clip-1"})),
                               calls(("speak", {"text": "All clean.", "voice": "nobody"})),
                               calls(("speak", {"text": "All clean.", "voice": "joe"})), answer("Done.")])  # fmt: skip
    model.speech, model.speech_tasks = head, ("tts", "ns")
    noisy = tiny.tone_clip(1.0, 330.0, seed=3)
    result = Agent(model, builtin_tools(model, ws), ws).run("Remove the background noise, then say so.", [noisy])
    assert result.answer == "Done." and [s.ok for s in result.steps[:3]] == [True, False, True]
    assert "unknown voice 'nobody'" in result.steps[1].result  # the model reads the error and tries again
    np.testing.assert_array_equal(ws.get("audio-1").samples, head.transform(noisy, "ns").waveform)
    np.testing.assert_array_equal(ws.get("audio-2").samples, head.say("All clean.", "joe").waveform)
    assert ws.get("audio-2").sample_rate == head.sample_rate and set(result.artifacts) == {"audio-1", "audio-2"}


def test_an_audio_answer_is_the_audio_the_models_call_made_or_none_for_a_text_answer(tmp_path):
    from omnivox.agent.agent_loop import audio_answer
    from omnivox.decoders.speech import SpeechHead

    head = SpeechHead.from_folder(tiny.add_speech_head(tmp_path / "ns", tasks={"tts": 0, "ns": 1}))
    noisy = tiny.tone_clip(1.0, 330.0, seed=4)
    model = ScriptedAssistant([calls(("remove_noise", {"clip": "clip-1"})), answer("Here it is without the noise.")])
    model.speech, model.speech_tasks = head, ("tts", "ns")
    result, made = audio_answer(model, "Remove the background noise.", [noisy])
    assert made is not None and result.answer == "Here it is without the noise."
    np.testing.assert_array_equal(made.samples, head.transform(noisy, "ns").waveform)
    offered = [spec.name for spec in model.asked[0]["tools"]]
    assert offered == ["remove_noise"]  # only the tools on audio: the text answer is spoken by the caller
    model = ScriptedAssistant([answer("A tone.")])
    model.speech, model.speech_tasks = head, ("tts", "ns")
    assert audio_answer(model, "What is this?", [noisy])[1] is None
    model.speech_tasks = ("tts",)
    with pytest.raises(UserInputError, match="does no task on audio"):
        audio_answer(model, "Remove the background noise.", [noisy])
