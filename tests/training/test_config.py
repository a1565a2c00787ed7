"""Recipe loading: clear errors that name the key, overrides, variables, the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnivox.training.config import ConfigError, load_train_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

MINIMAL = """
[model]
init_from = "some/folder"
[data]
dir = "data"
"""


def _load(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return load_train_config(path, overrides)


def test_minimal_recipe_and_overrides(tmp_path):
    config = _load(tmp_path, MINIMAL, ("optim.lr=5e-4", "stage=\"instruct\"", "data.tasks=[\"asr\"]", "out_dir=runs/x"))
    assert config.optim.lr == 5e-4 and config.stage == "instruct" and config.data.tasks == ("asr",)
    assert config.out_dir == "runs/x"  # a bare word is taken as a string
    assert config.multi_turn and not _load(tmp_path, MINIMAL).multi_turn


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (MINIMAL + "[optim]\nlr_rate = 1\n", (), "unknown key optim.lr_rate"),
        (MINIMAL, ("optim.lr=-1",), "optim.lr must be > 0, got -1"),
        (MINIMAL, ("optim.batch_size=2.5",), "optim.batch_size must be an integer"),
        (MINIMAL, ("stage=pretrain",), "stage must be one of \\['ctc', 'align', 'instruct', 'sound_encoder', 'codec', 'talker'\\]"),
        (MINIMAL, ("sound_encoder.max_seconds=2",), "\\[sound_encoder\\] is read only by stage 'sound_encoder'"),
        ("stage = 'sound_encoder'\n" + MINIMAL, (), "stage 'sound_encoder' has no \\[model\\] section"),
        (MINIMAL, ("dtype=fp16", "device=cpu"), "fp16 needs a GPU"),
        (MINIMAL, ("model.llm=x",), "model.init_from is set, so model.llm must be left out"),
        (MINIMAL.replace('init_from = "some/folder"', 'llm = "x"'), (), "model.encoders: a fresh model needs"),
        ("[data]\ndir = 'd'\n", (), "the \\[model\\] section is missing"),
        (MINIMAL.replace('"some/folder"', '"${base}"'), (), "model.init_from: \\$\\{base\\} is not defined"),
        (MINIMAL, ("optim.lr",), "expected KEY=VALUE"),
        ("[model\n", (), "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text, overrides)


def test_qformer_geometry_is_checked_early(tmp_path):
    text = MINIMAL.replace('init_from = "some/folder"', 'llm = "x"\nencoders = [{kind = "whisper", path = "w.pt"}]')
    with pytest.raises(ConfigError, match="model.qformer: hidden_size 30 is not divisible by num_heads 4"):
        _load(tmp_path, text + "[model.qformer]\nhidden_size = 30\nnum_heads = 4\n")


@pytest.mark.parametrize("name", ["nano_stage1", "nano_stage2", "salmonn7b_stage1", "salmonn7b_stage2"])
def test_shipped_recipes_parse(name):
    config = load_train_config(RECIPES / f"{name}.toml", ("vars.beats_path=/x/beats.pt",))
    assert config.stage == ("align" if name.endswith("1") else "instruct")


def test_sound_encoder_recipe_parses():
    config = load_train_config(RECIPES / "nano_beats.toml", ("vars.dataset=/x/synth", "optim.max_steps=650"))
    assert config.stage == "sound_encoder" and config.model is None
    assert config.data.dir == "/x/synth" and config.optim.max_steps == 650 and config.optim.betas == (0.9, 0.98)
    assert config.sound_encoder.max_seconds == 4.0 and config.sound_encoder.beats["encoder_layers"] == 4


def test_sound_encoder_section_defaults_when_left_out(tmp_path):
    config = _load(tmp_path, "stage = 'sound_encoder'\n[data]\ndir = 'd'\n")
    assert config.sound_encoder is not None and config.sound_encoder.frame_loss_weight == 1.0
