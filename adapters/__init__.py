"""Adapters between audio encoders and the LLM: fusion, window Q-Former, LoRA, converters."""
