"""The assembled model, processor, generation, CLI and servers."""
