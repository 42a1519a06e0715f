"""Typed run configs: YAML in, validated dataclasses out, with errors that name the key.

The dataclass defaults are the shapes quick-start recipe; a YAML file states only what differs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ldm_pipeline.presets import PRESETS, get_preset

STAGES = ("vae", "clip", "unet")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the problem."""


@dataclass
class DataConfig:
    """Which images and captions to train on."""

    name: str = "shapes"
    num_samples: int | None = 20_000
    resolution: int = 64
    seed: int = 0
    holdout: int = 256


@dataclass
class VAEConfig:
    """Stage ``vae``: an AutoencoderKL trained with L1/L2 + KL (+ optional PatchGAN)."""

    pretrained: str | None = None
    # Steps are sized to the quick start's minutes on a 2-core AVX2 CPU, so that the LR schedule
    # completes there; `max_minutes` is the hard stop.
    steps: int = 1300
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    # Train on random crops of this side (the VAE is convolutional): 4x fewer pixels per step at
    # 32 of 64, where full images made the VAE the slowest stage. None trains on whole images.
    crop_size: int | None = 32
    loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    # Starting the encoder's log-variance low keeps sampling noise from swamping early latents.
    logvar_init: float = -6.0
    gan_start_step: int | None = None
    gan_weight: float = 0.5
    max_minutes: float | None = None


@dataclass
class ClipConfig:
    """Stage ``clip``: a small CLIPModel trained contrastively; its text tower conditions the UNet."""

    pretrained: str | None = None
    steps: int = 150
    batch_size: int = 128
    learning_rate: float = 5e-4
    warmup_steps: int = 50
    max_minutes: float | None = None


@dataclass
class UNetConfig:
    """Stage ``unet``: the conditional UNet on cached latents and text embeddings."""

    pretrained: str | None = None
    steps: int = 1300
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    min_snr_gamma: float | None = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    # Save the EMA UNet every this many minutes of training (for adherence-vs-time curves).
    snapshot_every_minutes: int | None = None
    max_minutes: float | None = None


@dataclass
class RunConfig:
    """A whole run: the model preset, the data and each stage."""

    model: str = "shapes"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    seed: int = 0
    # "auto": bf16 where the hardware runs it fast (see ldm_pipeline.hardware), else fp32.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {type(value).__name__}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key{hint}; known keys: {sorted(hints)}")
        kwargs[key] = _check_type(value, hints[key], path)
    return cls(**kwargs)


def _positive(cfg: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{prefix}.{name}: must be positive, got {value}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check values that are impossible together or alone; return the config unchanged."""
    if cfg.model not in PRESETS:
        raise ConfigError(f"model: unknown preset {cfg.model!r}; known: {sorted(PRESETS)}")
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages: unknown stage {stage!r}; stages are {list(STAGES)}")
    preset = get_preset(cfg.model)
    factor = 2 ** (len(preset.vae.channels) - 1)
    if cfg.data.resolution <= 0 or cfg.data.resolution % factor:
        raise ConfigError(
            f"data.resolution: {cfg.data.resolution} is not a positive multiple of the VAE factor {factor} "
            f"of preset {cfg.model!r}"
        )
    _positive(cfg.data, "data", ("num_samples",))
    if cfg.data.holdout < 0:
        raise ConfigError(f"data.holdout: must be >= 0, got {cfg.data.holdout}")
    for name in STAGES:
        stage = getattr(cfg, name)
        _positive(stage, name, ("steps", "batch_size", "learning_rate", "max_minutes"))
        if stage.warmup_steps < 0:
            raise ConfigError(f"{name}.warmup_steps: must be >= 0, got {stage.warmup_steps}")
    _positive(cfg.unet, "unet", ("min_snr_gamma", "snapshot_every_minutes"))
    if not 0 <= cfg.unet.caption_dropout < 1:
        raise ConfigError(f"unet.caption_dropout: must be in [0, 1), got {cfg.unet.caption_dropout}")
    if not 0 < cfg.unet.ema_decay < 1:
        raise ConfigError(f"unet.ema_decay: must be in (0, 1), got {cfg.unet.ema_decay}")
    if cfg.vae.crop_size is not None and (
        cfg.vae.crop_size > cfg.data.resolution or cfg.vae.crop_size % factor or cfg.vae.crop_size <= 0
    ):
        raise ConfigError(
            f"vae.crop_size: {cfg.vae.crop_size} must be a positive multiple of the VAE factor {factor} "
            f"no larger than data.resolution {cfg.data.resolution}"
        )
    if cfg.vae.kl_weight < 0:
        raise ConfigError(f"vae.kl_weight: must be >= 0, got {cfg.vae.kl_weight}")
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. unet.steps=100")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node[part] = dict(child)
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> RunConfig:
    """Build and validate a `RunConfig` from a (possibly partial) nested dict."""
    return validate(_from_dict(RunConfig, apply_overrides(data or {}, overrides or []), ""))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (None: the defaults), apply overrides, validate."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return config_from_dict(data, overrides)


def to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain data, for writing next to a run's outputs."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
