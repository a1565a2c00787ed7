"""Tiny models in the real file formats, built by the tests themselves (nothing is downloaded).

- Whisper: an openai-whisper ``.pt`` (``{"dims", "model_state_dict"}``), 30 s windows.
- BEATs: an official-format ``{"cfg", "model"}`` checkpoint.
- SALMONN: an official-format ``{"model", "optimizer", "config", ...}`` checkpoint.
- LLM: an HF LLaMA folder with a BPE tokenizer trained here.
- omnivox: a model folder made of those parts.
- speech head: a nano-format codec (``codec/``) and a talker (``talker/``) added to a folder.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from omnivox.adapters.qformer import QFormerConfig

CORPUS = """
The quick brown fox jumps over the lazy dog. A man is speaking while music plays.
Please describe the audio. Transcribe the speech. What is said? Is anyone speaking?
Someone knocks on the door three times. The siren gets louder and then fades away.
Rain falls on the roof, and a car engine starts in the distance. Birds sing at dawn.
USER: ASSISTANT: <Speech></Speech> yes no one two three four five six seven eight nine ten
""".strip()

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (~300 tokens) with LLaMA-like and ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.split("\n") * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_llm(folder: Path, vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random LLaMA (hidden 32, 2 layers, 4 heads / 2 KV heads) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so greedy answers vary with the input
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder


def make_whisper(path: Path, n_state: int = 16, seed: int = 0, n_vocab: int = 64, n_text_ctx: int = 8) -> Path:
    """An openai-whisper checkpoint with tiny widths but the real 30 s / 1500-frame geometry.

    ``n_vocab=51864`` (English) gives a decoder that openai-whisper's tokenizer fits: its
    ``<|notimestamps|>`` and timestamp rows are zero (they are never among the best tokens, so
    searches that rule them out and searches that do not agree), and its weights are larger than
    the default init so that the audio steers the text.
    """
    import whisper.model

    torch.manual_seed(seed)
    dims = whisper.model.ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=n_state, n_audio_head=2, n_audio_layer=1,
        n_vocab=n_vocab, n_text_ctx=n_text_ctx, n_text_state=n_state, n_text_head=2, n_text_layer=1,
    )  # fmt: skip
    model = whisper.model.Whisper(dims)
    if n_vocab == 51864:
        with torch.no_grad():
            for name, p in model.decoder.named_parameters():
                if p.dim() == 2 and "token_embedding" not in name:
                    p.normal_(0.0, 0.3)
            model.decoder.token_embedding.weight.normal_(0.0, 1.0)
            model.decoder.token_embedding.weight[50362:] = 0.0  # <|notimestamps|> and the timestamps
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def make_beats(path: Path, dim: int = 16, seed: int = 0) -> Path:
    """An official-format BEATs checkpoint (1 layer of width ``dim``, full 16x16 patch geometry)."""
    from omnivox.encoders.beats import BeatsConfig, build_beats, save_checkpoint

    config = BeatsConfig(
        encoder_layers=1, encoder_embed_dim=dim, encoder_ffn_embed_dim=2 * dim, encoder_attention_heads=2,
        embed_dim=8, conv_pos=16, conv_pos_groups=4,
    )  # fmt: skip
    save_checkpoint(build_beats(config, seed=seed), path)
    return path


def make_salmonn_checkpoint(
    path: str | Path, *, whisper_dim: int, beats_dim: int, hidden: int, heads: int, layers: int = 2,
    llm_hidden: int, llm_layers: int, lora_r: int = 8, seed: int = 0, extras: bool = True,
    intermediate_size: int | None = None, queries_per_window: int = 1, llm_heads: int = 4,
) -> QFormerConfig:
    """Write a random checkpoint with exactly the official keys and file structure.

    The file is what SALMONN's ``Runner.save_checkpoint`` writes: ``{"model": trained params + all
    buffers, "optimizer": AdamW state, "config": run config dict, "scaler": None, "epoch": 0}``.
    With ``extras`` the model state also carries the tolerated buffers: BERT ``position_ids``
    ``[1, 512]``, rotary ``inv_freq`` per LLM layer, and ``beats.*`` shared-bias aliases; without
    it, ``"model"`` holds only the adapter and LoRA tensors.

    Args:
        path: where to write the ``.pth``.
        whisper_dim / beats_dim: encoder widths (1280 / 768 for the real one).
        hidden / heads / layers: Q-Former geometry; ``intermediate_size`` defaults to ``4 * hidden``.
        llm_hidden / llm_layers / llm_heads: LLM geometry (LoRA shapes, inv_freq length).
        lora_r: LoRA rank. LoRA B is random (not zero), so loaded LoRA changes the LLM's output.
        seed: all tensors come from ``torch.Generator().manual_seed(seed)``.

    Returns:
        The ``QFormerConfig`` the adapter tensors follow.
    """
    import json

    from omnivox.adapters.qformer import AudioAdapter, QFormerConfig
    from omnivox.convert.salmonn import QFORMER_PREFIX, export_salmonn_state

    gen = torch.Generator().manual_seed(seed)
    config = QFormerConfig(encoder_dims=(whisper_dim, beats_dim), hidden_size=hidden, num_layers=layers,
                           num_heads=heads, intermediate_size=intermediate_size or 4 * hidden,
                           queries_per_window=queries_per_window, llm_hidden_size=llm_hidden)
    adapter = AudioAdapter(config)
    norm_weights = {f"{n}.weight" for n, m in adapter.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            p.copy_((1.0 if name in norm_weights else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
    lora = {}
    for n in range(llm_layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{n}.self_attn.{proj}"
            lora[f"{prefix}.lora_A.weight"] = 0.1 * torch.randn(lora_r, llm_hidden, generator=gen)
            lora[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(llm_hidden, lora_r, generator=gen)
    model = export_salmonn_state(adapter, lora)
    trained = list(model)  # the optimizer saw these, in this order
    if extras:
        model[f"{QFORMER_PREFIX}embeddings.position_ids"] = torch.arange(512).expand(1, -1).clone()
        head_dim = llm_hidden // llm_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for n in range(llm_layers):
            model[f"llama_model.base_model.model.model.layers.{n}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        for n in range(1, 3):  # real BEATs: layers 1..11, [320 buckets, 12 heads]
            model[f"beats.encoder.layers.{n}.self_attn.relative_attention_bias.weight"] = torch.randn(
                320, 12, generator=gen)

    params = [torch.nn.Parameter(model[k].clone()) for k in trained]
    optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.05)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    run_config = {
        "model": {"llama_path": "vicuna", "whisper_path": "whisper", "beats_path": "beats",
                  "num_speech_query_token": queries_per_window, "second_per_window": 0.333333,
                  "second_stride": 0.333333, "lora": True, "lora_rank": lora_r, "lora_alpha": 32,
                  "lora_dropout": 0.1, "prompt_template": "USER: {}\nASSISTANT:", "end_sym": "</s>"},
        "run": {"seed": 42, "output_dir": "out"},
    }
    ckpt = {"model": model, "optimizer": optimizer.state_dict(), "config": json.loads(json.dumps(run_config)),
            "scaler": None, "epoch": 0}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return config


def make_model_folder(
    root: Path,
    *,
    prompt_style: str = "salmonn",
    trim_to_audio: bool = False,
    windows_per_batch: int = 4,
    overlap_seconds: float = 0.0,
    lora: bool = True,
    seed: int = 0,
) -> Path:
    """A complete tiny omnivox model folder (random weights) in ``root/model``; parts in ``root/parts``."""
    from omnivox.adapters.qformer import AudioAdapter, QFormerConfig
    from omnivox.agent.config import AudioSettings, EncoderRef, LoraSettings, OmnivoxConfig
    from omnivox.agent.loading import attach_lora, load_llm
    from omnivox.agent.model import OmnivoxModel
    from omnivox.encoders.beats import BeatsEncoder
    from omnivox.encoders.whisper import WhisperEncoder

    parts = root / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(parts / "llm")
    make_llm(parts / "llm", vocab_size=len(tokenizer), seed=seed)
    make_whisper(parts / "whisper.pt", seed=seed)
    make_beats(parts / "beats.pt", seed=seed)
    config = OmnivoxConfig(
        llm=str(parts / "llm"),
        encoders=(EncoderRef("whisper", str(parts / "whisper.pt")), EncoderRef("beats", str(parts / "beats.pt"))),
        qformer=QFormerConfig(
            encoder_dims=(16, 16), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, llm_hidden_size=32
        ),
        lora=LoraSettings() if lora else None,
        prompt_style=prompt_style,
        audio=AudioSettings(trim_to_audio=trim_to_audio, windows_per_batch=windows_per_batch, overlap_seconds=overlap_seconds),
    )
    torch.manual_seed(seed)
    adapter = AudioAdapter(config.qformer)
    with torch.no_grad():  # stronger than BERT init so that audio visibly steers the tiny LLM
        for p in adapter.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    llm = load_llm(str(parts / "llm"), runtime=False)  # peft wraps it below
    if lora:
        llm = attach_lora(llm, config, None)
        with torch.no_grad():  # peft initialises B to zero; make the LoRA matter
            for name, p in llm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
    encoders = [WhisperEncoder.from_pretrained(str(parts / "whisper.pt")), BeatsEncoder.from_checkpoint(parts / "beats.pt")]
    model = OmnivoxModel(config, encoders, adapter, llm, tokenizer)
    return model.save_pretrained(root / "model")


TINY_VOICES = ("kokoro:jf_tiny", "piper:joe")


def add_speech_head(folder: Path, seed: int = 0, voices: tuple[str, ...] = TINY_VOICES, tasks: dict[str, int] | None = None) -> Path:
    """Give a model folder a tiny random speech head: ``codec/`` (a nano-format MelCodec) and
    ``talker/`` (a talker emitting its codes; with ``tasks`` beyond tts, one that also reads
    input clips); returns ``folder``."""
    from omnivox.decoders.codec import MelCodec, MelCodecConfig, save_mel_codec
    from omnivox.decoders.phonemes import PHONEMES
    from omnivox.decoders.speech import save_talker
    from omnivox.decoders.talker import Talker, TalkerConfig

    torch.manual_seed(seed)
    codec = MelCodec(MelCodecConfig(n_mels=8, num_codebooks=3, codebook_size=16, dim=16, intermediate_dim=32,
                                    num_layers=2, kernel_size=3)).eval()  # fmt: skip
    save_mel_codec(codec, folder / "codec")
    config = TalkerConfig(num_phonemes=len(PHONEMES), num_codebooks=3, codebook_size=16, n_mels=8, dim=32, heads=4, ffn=64,
                          encoder_layers=1, decoder_layers=2, dropout=0.0, num_voices=len(voices), num_tasks=2,
                          max_phoneme_frames=6, max_positions=512, source_mels=8 if tasks else 0, source_layers=1,
                          )  # fmt: skip
    if tasks:
        config = replace(config, num_tasks=max(tasks.values()) + 1)
    save_talker(Talker(config).eval(), list(voices), "codec", folder / "talker", default_voice=voices[0], tasks=tasks)
    return folder


def tone_clip(seconds: float, freq: float = 440.0, seed: int = 0, sample_rate: int = 16000):
    """A float32 tone plus a little noise (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def greedy_copy(model_dir: Path, parent: Path, max_new_tokens: int = 8, name: str = "tiny-greedy") -> Path:
    """A copy of a model folder whose default decoding is greedy (so answers stream) and short."""
    import json
    import shutil

    folder = Path(parent) / name
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["generation"] = {"num_beams": 1, "max_new_tokens": max_new_tokens}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def serving(app, timeout_keep_alive: int = 5):
    """``app`` served on a free loopback port (:func:`omnivox.agent.server.serve_in_thread`); yields its base URL."""
    from omnivox.agent.server import serve_in_thread

    return serve_in_thread(app, timeout_keep_alive=timeout_keep_alive)
