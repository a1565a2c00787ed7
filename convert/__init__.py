"""Checkpoint converters: other projects' formats -> omnivox's.

- :mod:`omnivox.convert.salmonn`: official SALMONN ``.pth`` <-> adapter + peft LoRA weights,
  and a SALMONN checkpoint -> omnivox model folder;
- :mod:`omnivox.convert.whisper_ct2`: CTranslate2 (faster-whisper) Whisper -> openai-whisper ``.pt``;
- :mod:`omnivox.convert.cli`: the ``omnivox convert whisper|salmonn`` commands.

Nothing is imported here: each converter pulls in torch and its own format's readers.
"""
