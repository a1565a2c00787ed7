"""omnivox's runtime: the model, its steps, tools and the agent loop, and the interfaces that reach them.

The names below import on first use (``from omnivox.agent import Agent``), so that importing one
module of the package does not load all of them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Assistant": "omnivox.agent.assistant",
    "Agent": "omnivox.agent.agent_loop",
    "AgentResult": "omnivox.agent.agent_loop",
    "Tool": "omnivox.agent.tools",
    "ToolCall": "omnivox.agent.tools",
    "ToolRegistry": "omnivox.agent.tools",
    "tool": "omnivox.agent.tools",
    "Workspace": "omnivox.agent.workspace",
    "builtin_tools": "omnivox.agent.builtin_tools",
    "Generation": "omnivox.agent.generation",
    "GenerationSettings": "omnivox.agent.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'omnivox.agent' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
