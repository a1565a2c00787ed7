"""omnivox: an LLM-centric, any-to-any audio agent.

The user-facing pieces live in sub-packages: ``omnivox.encoders`` (Whisper, BEATs),
``omnivox.adapters`` (window Q-Former, LoRA, checkpoint converters),
``omnivox.decoders`` (generation heads), ``omnivox.prompts`` (prompt styles) and
``omnivox.agent`` (the assembled model, CLI and servers).
"""

__version__ = "0.1.0"
