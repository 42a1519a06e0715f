from pathlib import Path

import pytest
from ldm_pipeline.configs import shipped
from ldm_pipeline.training.config import ConfigError, RunConfig, config_from_dict, load_config, save_config
from ldm_pipeline.training.quickstart import quickstart_config

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
        ({"unet": {"timestep_density": "cosine"}}, r"unet.timestep_density: must be one of \['uniform'"),
        ({"unet": {"timestep_logit_std": 0}}, "unet.timestep_logit_std: must be > 0, got 0"),
        ({"vae": {"standardise_latents": "yes"}}, "vae.standardise_latents: must be"),
        ({"vae": {"lr_scheduler": "cosine_decay"}}, "vae.lr_scheduler: must be one of"),
        ({"clip": {"gradient_accumulation_steps": 0}}, "clip.gradient_accumulation_steps: must be positive"),
        ({"unet": {"noise_offset": -0.1}}, "unet.noise_offset: must be >= 0"),
        ({"unet": {"noise_candidates": 1}}, "unet.noise_candidates: must be at least 2"),
        ({"unet": {"noise_assignment": "hungarian"}}, "unet.noise_assignment"),
        ({"unet": {"optimizer": "sgd"}}, r"unet.optimizer: must be one of \['adamw', 'adamw8bit'\]"),
        ({"report_to": "mlflow"}, "report_to: must be one of"),
        ({"unet": {"learning_rate": float("inf")}}, "unet.learning_rate: must be a finite number, got inf"),
        ({"unet": {"max_grad_norm": float("nan")}}, "unet.max_grad_norm: must be a finite number, got nan"),
        ({"vae": {"target": float("-inf")}}, "vae.target: must be a finite number"),
        ({"seed": -1}, r"seed: must be an integer from 0 to 4294967295 \(2\*\*32 - 1\), got -1"),
        ({"seed": 2**32}, "seed: must be an integer from 0 to 4294967295 .*, got 4294967296"),
        ({"data": {"seed": -5}}, "data.seed: must be an integer from 0 to 4294967295 .*, got -5"),
        ({"data": {"seed": 10**30}}, "data.seed: must be an integer from 0 to 4294967295"),
        (["unet"], "a run config must be a mapping of keys"),
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


def test_shipped_configs_are_installed_valid_and_are_the_quickstart():
    # Every file of configs/ is package data of the installed ldm_pipeline.configs, byte for byte.
    files = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml"))
    assert len(files) >= 10
    for name in files:
        assert shipped(str(name)).read_bytes() == (CONFIGS / name).read_bytes(), name
    with pytest.raises(FileNotFoundError, match="no shipped config named nothing.yaml"):
        shipped("nothing.yaml")
    assert load_config(CONFIGS / "shapes.yaml") == quickstart_config()
    assert load_config(CONFIGS / "tiny.yaml") == quickstart_config(smoke=True)
    assert quickstart_config().unet.target == 0.97
    digits = load_config(CONFIGS / "digits.yaml")
    assert (digits.data.name, digits.unet.target, digits.unet.eval_every) == ("digits", 0.98, 250)
    emoji = load_config(CONFIGS / "emoji.yaml")
    assert (emoji.data.name, emoji.vae.target, emoji.unet.eval_every) == ("emoji", 27.0, 500)


def test_bare_no_in_yaml_means_the_string_no(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"


def test_numbers_as_people_write_them(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; YAML 1.2, and every user, as a float.
    path = tmp_path / "run.yaml"
    path.write_text("unet:\n  learning_rate: 1e-4\nvae:\n  learning_rate: 3E-3\n  kl_weight: 1e-6\n")
    cfg = load_config(path, ["unet.max_grad_norm=5e-1", "clip.learning_rate=+2e-4"])
    assert (cfg.unet.learning_rate, cfg.vae.learning_rate, cfg.vae.kl_weight) == (1e-4, 3e-3, 1e-6)
    assert (cfg.unet.max_grad_norm, cfg.clip.learning_rate) == (0.5, 2e-4)
    assert load_config(None, ["unet.steps=12"]).unet.steps == 12  # integers stay integers


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- vae\n- unet\n", r"run.yaml: a run config must be a mapping of keys .*got a list"),
        ("just words\n", r"run.yaml: a run config must be a mapping of keys .*got a str \('just words'\)"),
        ("42\n", "got a int"),
        ("unet:\n  steps: [1, 2\n", r"run.yaml, line 3, column 1: not valid YAML: .*expected ',' or ']'"),
        ("unet:\n\tsteps: 3\n", r"run.yaml, line 2, column 1: not valid YAML: .*'\\t' that cannot start any token"),
        (
            "unet: {steps: 1}\nunet: {steps: 2}\n",
            "run.yaml, line 2, column 1: not valid YAML: the key 'unet' is given twice",
        ),
        ("unet:\n  learning_rate: .inf\n", "unet.learning_rate: must be a finite number, got inf"),
    ],
)
def test_broken_config_files_get_one_line_naming_file_line_and_problem(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_broken_overrides_and_encodings_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'unet.steps=\[1', line 1, column 3: not valid YAML"):
        load_config(None, ["unet.steps=[1"])
    with pytest.raises(ConfigError, match="unet.learning_rate: must be a finite number, got nan"):
        load_config(None, ["unet.learning_rate=.nan"])
    (tmp_path / "utf16.yaml").write_bytes("unet: {}".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"utf16.yaml: not UTF-8 text \(byte 0xff at 0\)"):
        load_config(tmp_path / "utf16.yaml")
