"""Reproducible synthetic training data for the bundled nano model.

``generate(out_dir, hours, seed, workers)`` renders speech (espeak-ng; Piper and Kokoro when
installed), procedural sound events and their mixtures into 16 kHz wav files with
instruction/answer manifests; ``main_synth(argv)`` is the ``omnivox data synth`` command.
"""

from omnivox.datagen.generate import (
    GENERATOR_VERSION,
    SynthOptions,
    build_synth_parser,
    generate,
    main_synth,
    run_synth,
)

__all__ = ["GENERATOR_VERSION", "SynthOptions", "build_synth_parser", "generate", "main_synth", "run_synth"]
