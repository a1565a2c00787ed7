"""Adapters between audio encoders and the LLM: fusion, window Q-Former, LoRA, CTC head.

Checkpoint converters (SALMONN, CTranslate2 Whisper) live in :mod:`omnivox.convert`.
"""
