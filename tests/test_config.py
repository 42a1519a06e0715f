from pathlib import Path

import pytest

from training.config import ConfigError, RunConfig, config_from_dict, load_config, save_config
from training.quickstart import quickstart_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"unet": {"learning_rat": 1e-3}}, r"unet\.learning_rat: unknown key \(did you mean 'learning_rate'\?\)"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"unet": {"steps": "many"}}, "unet.steps: must be int, got str"),
        ({"unet": {"steps": 2.5}}, "unet.steps: must be int, got float"),
        ({"vae": {"learning_rate": -1e-4}}, "vae.learning_rate: must be positive"),
        ({"data": {"resolution": 66}}, "data.resolution: 66 is not a positive multiple of 16 \\(VAE factor 4"),
        (
            {"unet": {"prediction_type": "x0"}},
            r"unet.prediction_type: must be one of \['epsilon', 'v_prediction', 'sample'\]",
        ),
        ({"unet": {"caption_dropout": 1.0}}, r"unet.caption_dropout: must be in \[0, 1\)"),
        ({"stages": ["vae", "decoder"]}, "stages: unknown stage 'decoder'"),
        ({"model": "huge"}, "model: unknown preset 'huge'"),
        ({"vae": {"crop_size": 30}}, "vae.crop_size: 30 must be a positive multiple"),
        ({"vae": 3}, "vae: must be a mapping"),
        ({"mixed_precision": True}, "mixed_precision: must be one of"),
        ({"unet": {"zero_terminal_snr": True}}, "unet.zero_terminal_snr: needs unet.prediction_type v_prediction"),
        ({"unet": {"timestep_range": [500, 100]}}, r"unet.timestep_range: must be \[low, high\]"),
        ({"unet": {"timestep_range": [0, 1001]}}, r"unet.timestep_range: must be \[low, high\]"),
        ({"vae": {"lr_scheduler": "cosine_decay"}}, "vae.lr_scheduler: must be one of"),
        ({"clip": {"gradient_accumulation_steps": 0}}, "clip.gradient_accumulation_steps: must be positive"),
        ({"unet": {"noise_offset": -0.1}}, "unet.noise_offset: must be >= 0"),
        ({"unet": {"optimizer": "sgd"}}, r"unet.optimizer: must be one of \['adamw', 'adamw8bit'\]"),
        ({"report_to": "mlflow"}, "report_to: must be one of"),
    ],
)
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_defaults_overrides_and_types():
    cfg = config_from_dict({"unet": {"learning_rate": 2}}, ["unet.steps=7", "vae.crop_size=null", "stages=[unet]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.unet.learning_rate == 2.0 and isinstance(cfg.unet.learning_rate, float)
    assert (cfg.unet.steps, cfg.vae.crop_size, cfg.stages) == (7, None, ["unet"])
    with pytest.raises(ConfigError, match="expected key=value"):
        config_from_dict({}, ["unet.steps"])


def test_yaml_round_trip_and_file_errors(tmp_path):
    cfg = config_from_dict({}, ["unet.steps=11"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("unet: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_shipped_configs_are_valid_and_match_the_quickstart():
    assert load_config(CONFIGS / "shapes.yaml") == quickstart_config()
    assert load_config(CONFIGS / "tiny.yaml") == quickstart_config(smoke=True)
    assert load_config(CONFIGS / "digits.yaml").data.name == "digits"


def test_bare_no_in_yaml_means_the_string_no(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
