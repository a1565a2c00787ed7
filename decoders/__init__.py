"""Generation heads (codec and diffusion decoders)."""
