"""The agent loop: call -> run -> observe -> answer, bounded in steps and time, every step traced.

The model is offered tools (``agent/tools.py``) and answers with calls or with text. Calls run in
order; each result (or the tool's error, as text) goes back as a ``tool`` turn and the model is
asked again. The loop ends when the model answers in text, or when the step or time budget is
spent: then the model is asked once more with ``tool_choice="none"``, so there is always an answer.

    agent = Agent(assistant, builtin_tools(assistant, workspace), workspace)
    result = agent.run("Cut the first two seconds and tell me what is said there.", ["talk.wav"])
    print(result.answer); print(result.trace_json())
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from omnivox.agent.generation import GenerationSettings
from omnivox.agent.tools import ToolCall, ToolError, ToolRegistry
from omnivox.agent.workspace import AudioArtifact, Workspace
from omnivox.errors import UserInputError
from omnivox.prompts import Message, calls_text, result_text

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One step of a run: a call and what it gave, or the final answer.

    Attributes:
        kind: "call" or "answer".
        name, arguments, call_id: the call (kind "call").
        result: the text the model read back (the tool's output, or "error: ...").
        ok: False when the tool failed or its arguments did not validate.
        artifacts: ids of audio the call made.
        text: the answer (kind "answer").
        seconds: wall time of the step (model + tool).
    """

    kind: Literal["call", "answer"]
    name: str | None = None
    arguments: dict[str, Any] | None = None
    call_id: str | None = None
    result: str | None = None
    ok: bool = True
    artifacts: list[str] = field(default_factory=list)
    text: str | None = None
    seconds: float = 0.0

    def line(self) -> str:
        """The step as one line for a terminal."""
        if self.kind == "answer":
            return f"answer: {self.text}"
        args = json.dumps(self.arguments, ensure_ascii=False)
        mark = "->" if self.ok else "!!"
        return f"call {self.name}({args}) {mark} {self.result}"


@dataclass
class AgentResult:
    """What a run gave: the answer, every step, and why it stopped ("answer", "max_steps", "timeout")."""

    answer: str
    steps: list[Step]
    stopped_by: str
    clips: list[str]
    artifacts: dict[str, str]

    def trace_json(self) -> str:
        return json.dumps(
            {"answer": self.answer, "stopped_by": self.stopped_by, "clips": self.clips,
             "artifacts": self.artifacts, "steps": [asdict(s) for s in self.steps]},
            ensure_ascii=False, indent=2,
        )  # fmt: skip


class Agent:
    """Runs goals with a model and a set of tools.

    Args:
        assistant: the model (:class:`Assistant`).
        tools: the tools offered.
        workspace: where clips and the audio tools make live (and the allowed directory).
        max_steps: most rounds of calls before the model must answer.
        max_seconds: wall-time budget of a run; past it the model must answer.
        raise_on_tool_error: raise a tool's error instead of returning it to the model as text.
        settings: decoding (default greedy, the folder's other defaults).
    """

    def __init__(
        self,
        assistant,
        tools: ToolRegistry,
        workspace: Workspace,
        max_steps: int = 6,
        max_seconds: float = 300.0,
        raise_on_tool_error: bool = False,
        settings: GenerationSettings | None = None,
    ) -> None:
        if max_steps < 1:
            raise UserInputError(f"max_steps must be >= 1, got {max_steps}")
        if not max_seconds > 0:
            raise UserInputError(f"max_seconds must be > 0, got {max_seconds}")
        self.assistant = assistant
        self.tools = tools
        self.workspace = workspace
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.raise_on_tool_error = raise_on_tool_error
        self.settings = settings or assistant.settings(num_beams=1)

    def _clip_ids(self, audio: Sequence[str | Path | np.ndarray]) -> list[str]:
        ids = []
        for item in audio:
            if isinstance(item, np.ndarray):
                ids.append(self.workspace.add_clip(item))
            else:
                ids.append(self.workspace.add_file(item))
        return ids

    def run(
        self,
        goal: str,
        audio: Sequence[str | Path | np.ndarray] = (),
        on_step: Callable[[Step], None] | None = None,
    ) -> AgentResult:
        """Work on ``goal`` about ``audio`` (paths inside the allowed directory, or 16 kHz arrays)."""
        if not goal.strip():
            raise UserInputError("the goal is empty")
        started = time.monotonic()
        clip_ids = self._clip_ids(audio)
        clips = [self.assistant.encode_clip(self.workspace.get(c).for_model()) for c in clip_ids]
        messages = [Message("user", goal, num_audio=len(clips))]
        specs = [t.spec() for t in self.tools]
        steps: list[Step] = []

        def record(step: Step) -> None:
            steps.append(step)
            if on_step is not None:
                on_step(step)

        stopped_by = "answer"
        for _ in range(self.max_steps):
            if time.monotonic() - started > self.max_seconds:
                stopped_by = "timeout"
                break
            t0 = time.monotonic()
            answer = self.assistant.generate([messages], [clips], self.settings, tools=specs, tool_choice="auto")[0]
            if not answer.tool_calls:
                record(Step("answer", text=answer.text.strip(), seconds=time.monotonic() - t0))
                return self._result(steps, "answer", clip_ids)
            messages.append(Message("assistant", calls_text([(c.name, c.arguments) for c in answer.tool_calls])))
            model_seconds = (time.monotonic() - t0) / len(answer.tool_calls)
            for call in answer.tool_calls:
                step = self._run_call(call)
                step.seconds += model_seconds
                messages.append(Message("tool", result_text(call.name, step.result or "")))
                record(step)
        else:
            stopped_by = "max_steps"
        t0 = time.monotonic()
        final = self.assistant.generate([messages], [clips], self.settings, tools=specs, tool_choice="none")[0]
        record(Step("answer", text=final.text.strip(), seconds=time.monotonic() - t0))
        return self._result(steps, stopped_by, clip_ids)

    def _run_call(self, call: ToolCall) -> Step:
        t0 = time.monotonic()
        try:
            if call.name not in self.tools:  # the grammar offers only these; a hand-made call may not
                raise ToolError(f"no tool named {call.name!r}")
            result = self.tools.get(call.name).run(call.arguments)
        except (ToolError, UserInputError) as err:  # the model's call or the tool failed: tell the model
            if self.raise_on_tool_error:
                raise
            error = f"error: {' '.join(str(err).split())}"
            log.info("tool %s failed: %s", call.name, error)
            return Step("call", call.name, call.arguments, call.id, error, False, seconds=time.monotonic() - t0)
        return Step("call", call.name, call.arguments, call.id, result.text, True, list(result.artifacts),
                    seconds=time.monotonic() - t0)  # fmt: skip

    def _result(self, steps: list[Step], stopped_by: str, clip_ids: list[str]) -> AgentResult:
        made = {}
        for step in steps:
            for artifact in step.artifacts:
                item = self.workspace.get(artifact)
                made[artifact] = str(item.path) if item.path is not None else ""
        answer = steps[-1].text or ""
        return AgentResult(answer, steps, stopped_by, clip_ids, made)


def audio_answer(
    assistant, request: str, clips: Sequence[np.ndarray], settings: GenerationSettings | None = None, max_steps: int = 3,
) -> tuple[AgentResult, AudioArtifact | None]:  # fmt: skip
    """A request about ``clips`` whose answer may be audio (``omnivox chat --out``).

    The model is offered the tools on audio that its speech head does (``remove_noise``, ...:
    ``builtin_tools.AUDIO_TASK_TOOLS``). When it calls one, the call runs and the last audio made
    is the answer; when it answers in text, the audio is None (the caller speaks the text).
    The decision is the model's: "Remove the background noise." is answered by a call only by a
    model that learned to make it.
    """
    from omnivox.agent.builtin_tools import AUDIO_TASK_TOOLS, builtin_tools

    workspace = Workspace(write_artifacts=False)
    registry = builtin_tools(assistant, workspace)
    tools = ToolRegistry(registry.select([n for n in AUDIO_TASK_TOOLS if n in registry]))
    if not len(tools):
        raise UserInputError("this model's speech head does no task on audio (it was trained for "
                             f"{sorted(assistant.speech_tasks) or 'nothing'})")  # fmt: skip
    result = Agent(assistant, tools, workspace, max_steps=max_steps, settings=settings).run(request, list(clips))
    made = [a for step in result.steps if step.ok for a in step.artifacts]
    return result, workspace.get(made[-1]) if made else None
