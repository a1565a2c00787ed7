"""omnivox export: a self-contained copy of a run's model folder."""

from __future__ import annotations

import json

import tiny
import torch
from safetensors.torch import save_file

from omnivox.agent import cli
from omnivox.agent.generation import GenerationSettings
from omnivox.agent.model import OmnivoxModel
from omnivox.decoders.codec import MelCodec, MelCodecConfig, load_codec, save_mel_codec
from omnivox.prompts import Message


def _logits(model, clip):
    batch = model.build_inputs([[Message("user", "What is said?", num_audio=1)]], [[model.encode_clip(clip)]])
    return model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits[0, -1]


def test_export_copies_local_encoders_and_keeps_other_files(tmp_path, capsys):
    src = tiny.make_model_folder(tmp_path / "run")  # encoders in run/parts, by absolute path
    save_file({"blank": torch.randn(32), "log_scale": torch.zeros(())}, src / "ctc_head.safetensors")  # tiny LLM: 32 wide
    codec = MelCodec(MelCodecConfig(n_mels=8, num_codebooks=2, codebook_size=8, dim=8, intermediate_dim=16, num_layers=1))
    save_mel_codec(codec, src / "codec")  # the speech codec travels with the folder
    dst = tmp_path / "bundle"
    dst.mkdir()
    (dst / "README.md").write_text("model card")
    rc = cli.main(["export", str(src), "--out", str(dst), "--generation", '{"num_beams": 1, "max_new_tokens": 9}'])
    assert rc == 0 and capsys.readouterr().out.strip() == str(dst)
    assert sorted(p.name for p in dst.iterdir()) == [
        "README.md", "adapter.safetensors", "beats.pt", "codec", "config.json", "ctc_head.safetensors", "lora", "tokenizer",
        "whisper.pt",
    ]
    assert load_codec(dst / "codec").config == codec.config
    config = json.loads((dst / "config.json").read_text())
    assert [e["path"] for e in config["encoders"]] == ["whisper.pt", "beats.pt"]
    assert config["generation"] == {"num_beams": 1, "max_new_tokens": 9}
    assert json.loads((dst / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == config["llm"]
    clip = tiny.tone_clip(2.0)
    expected = _logits(OmnivoxModel.from_pretrained(src), clip)
    for name in ("whisper.pt", "beats.pt"):  # the encoder files it came from can go: the bundle has its own
        (tmp_path / "run" / "parts" / name).unlink()
    bundled = OmnivoxModel.from_pretrained(dst)
    assert bundled.config.generation == GenerationSettings.greedy(max_new_tokens=9)
    torch.testing.assert_close(_logits(bundled, clip), expected, rtol=0, atol=0)
    assert bundled.ctc_head is not None  # the CTC head came along (joint transcript decoding)


def test_export_rejects_bad_input_in_one_line(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["export", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--generation", "[1]"]) == 2
    assert "expected a JSON object" in capsys.readouterr().err
    assert cli.main(["export", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--generation", '{"beams": 2}']) == 2
    assert "--generation: unknown decoding settings ['beams']" in capsys.readouterr().err
    assert cli.main(["export", str(tiny_model_dir), "--out", str(tiny_model_dir)]) == 2
    assert "same folder" in capsys.readouterr().err
