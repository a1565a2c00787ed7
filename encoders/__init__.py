"""Frozen audio encoders. Each one implements :class:`omnivox.encoders.base.AudioEncoder`."""

from omnivox.encoders.base import AudioEncoder, EncoderOutput

__all__ = ["AudioEncoder", "EncoderOutput"]
