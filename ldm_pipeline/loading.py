"""Load a saved pipeline from a local folder or a Hub id, with errors that name the problem."""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextModel

from .errors import InputError
from .pipeline import LatentDiffusionPipeline

# Hub ids are "name" or "owner/name" with letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(InputError):
    """A model folder or Hub id that cannot be loaded; the message says why."""


# The pipeline's weighted components and their classes: loaded one by one, strictly.
MODEL_COMPONENTS = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "unet": UNet2DConditionModel}


T = TypeVar("T")

# model_index.json may name classes of these libraries only: loading imports the library named.
INDEX_LIBRARIES = ("diffusers", "transformers")


def non_finite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors (a state dict, a weight file) that hold a NaN or an infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _require_source(source: str | os.PathLike) -> None:
    """Refuse a path that is not here before any library takes it for a Hub id."""
    text = str(source)
    if not os.path.exists(text) and (not _HUB_ID.match(text) or text.startswith((".", "/", "~"))):
        raise ModelLoadError(f"model folder not found: {text}")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model(cls: type, source: str, subfolder: str | None = None, allow_pickle: bool = False, **kwargs):
    """``cls.from_pretrained`` that refuses pickle weights and any key mismatch.

    Weights are read from safetensors only unless ``allow_pickle`` (a pickle file can run code
    when loaded). Missing, unexpected or mis-shaped keys raise instead of the libraries' warning
    and random initialisation. Remote code never runs (``trust_remote_code`` stays off).

    Raises:
        ModelLoadError: no safetensors weights, unreadable files, or keys that do not match.
    """
    _require_source(source)
    where = f"{source}/{subfolder}" if subfolder else str(source)
    folder = os.path.join(source, subfolder or "")
    try:
        if subfolder:
            kwargs["subfolder"] = subfolder
        model, info = cls.from_pretrained(
            source,
            use_safetensors=None if allow_pickle else True,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        pickles = (
            [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if (os.path.isdir(folder))
            else []
        )
        if pickles and not allow_pickle and not any(f.endswith(".safetensors") for f in os.listdir(folder)):
            raise ModelLoadError(
                f"{where} has only pickle weights ({', '.join(sorted(pickles))}); loading pickle can run code: "
                "convert them to safetensors, or allow pickle (allow_pickle / --allow-pickle) if you trust the source"
            ) from err
        raise ModelLoadError(f"could not load {cls.__name__} from {where}: {_first_line(err)}") from err
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
        raise ModelLoadError(f"the weights in {where} do not match {cls.__name__}'s config: {detail}")
    # Checked once here, so that a damaged file never reaches sampling or a saved fine-tune.
    bad = non_finite_keys(model.state_dict())
    if bad:
        raise ModelLoadError(
            f"{where} holds non-finite weights (NaN or Inf) in {bad[:5]}{' ...' if len(bad) > 5 else ''}: "
            "the file is damaged or was saved from a run that diverged"
        )
    return model


def _check_model_index(folder: str) -> None:
    """Refuse a ``model_index.json`` that is not JSON or names a library or class that is not there."""
    path = os.path.join(folder, "model_index.json")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(index, dict):
        raise ModelLoadError(f"{path}: must be a JSON object, got a {type(index).__name__}")
    components, _ = LatentDiffusionPipeline._get_signature_keys(LatentDiffusionPipeline)
    for name, entry in index.items():
        # Other keys are pipeline settings (``requires_safety_checker: false``), not components.
        if name.startswith("_") or not (isinstance(entry, list) or name in components) or entry == [None, None]:
            continue
        if not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(e, str) for e in entry):
            raise ModelLoadError(f"{path}: {name} must be [library, class], got {entry}")
        library, class_name = entry
        if library not in INDEX_LIBRARIES:
            raise ModelLoadError(f"{path}: {name} names the library {library!r}; only {list(INDEX_LIBRARIES)} load")
        module = importlib.import_module(library)
        if not hasattr(module, class_name):
            raise ModelLoadError(
                f"{path}: {name} names {library}.{class_name}, which {library} {module.__version__} does not have"
            )


def load_pipeline(
    model: str | os.PathLike, torch_dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> LatentDiffusionPipeline:
    """Load a `LatentDiffusionPipeline` from a folder or a Hub id through ``from_pretrained``.

    The VAE, text encoder and UNet are loaded strictly by `load_model` (safetensors only unless
    ``allow_pickle``, every key checked), then handed to ``from_pretrained`` with the rest.

    Raises:
        ModelLoadError: the folder is missing or not a pipeline folder, the Hub id cannot be
            fetched (no network, unknown repository), or a component does not load strictly.
    """
    model = str(model)
    _require_source(model)
    if os.path.exists(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ModelLoadError(f"{model} is not a pipeline folder: it has no model_index.json")
        _check_model_index(model)
    parts = {
        name: load_model(cls, model, name, allow_pickle, torch_dtype=torch_dtype)
        for name, cls in MODEL_COMPONENTS.items()
    }
    try:
        return LatentDiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype, trust_remote_code=False, **parts)
    except (OSError, ValueError, KeyError, AttributeError, ImportError, SafetensorError) as err:
        where = "folder" if os.path.exists(model) else "Hub id"
        raise ModelLoadError(f"could not load the pipeline from {where} {model!r}: {_first_line(err)}") from err


def _in_source(source: str, subfolder: str, load: Callable[[str | None], T], retry: type[Exception]) -> T:
    """``load(subfolder or None)`` where ``source`` keeps the part: a folder holds it in ``subfolder``
    (a pipeline or run folder) or is the part itself; a Hub id is the part itself, else holds it in
    ``subfolder`` (tried when the first attempt raises ``retry``)."""
    _require_source(source)
    if os.path.isdir(source):
        return load(subfolder if os.path.isdir(os.path.join(source, subfolder)) else None)
    try:
        return load(None)
    except retry:
        return load(subfolder)


def load_component(cls: type, source: str, subfolder: str, allow_pickle: bool = False, **kwargs):
    """Load one model (e.g. ``AutoencoderKL``) strictly (`load_model`) from a folder or Hub id.

    ``source`` may hold the model itself (``stabilityai/sd-vae-ft-mse``) or a whole pipeline or
    training-run folder, in which case the model is read from its ``subfolder`` (``vae``,
    ``text_encoder``, ...). Tokenizers and other weightless parts load with ``from_pretrained``.
    """
    if issubclass(cls, torch.nn.Module):
        return _in_source(
            source, subfolder, lambda sub: load_model(cls, source, sub, allow_pickle, **kwargs), ModelLoadError
        )
    return _in_source(source, subfolder, lambda sub: cls.from_pretrained(source, subfolder=sub, **kwargs), OSError)


def load_component_config(cls: type, source: str, subfolder: str) -> dict:
    """The config of the model `load_component` would load (``cls.load_config``), without weights.

    Raises:
        ModelLoadError: the folder or Hub id holds no such config.
    """

    def read(sub: str | None) -> dict:
        if hasattr(cls, "load_config"):  # diffusers
            return dict(cls.load_config(source, subfolder=sub))
        return cls.config_class.from_pretrained(source, subfolder=sub or "").to_dict()  # transformers

    try:
        return _in_source(source, subfolder, read, OSError)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read the {subfolder} config from {source!r}: {_first_line(err)}") from err


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def load_lora(pipe: LatentDiffusionPipeline, folder: str | os.PathLike) -> None:
    """``pipe.load_lora_weights(folder)`` after checking the file: there, readable, finite.

    Raises:
        ModelLoadError: no LoRA file, a damaged or non-finite one, or adapters whose modules the
            pipeline does not have (a LoRA trained for another model).
    """
    path = os.path.join(folder, LORA_WEIGHTS)
    if not os.path.isfile(path):
        raise ModelLoadError(f"LoRA folder {folder}: no {LORA_WEIGHTS} in it")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"LoRA {path} is unreadable: {_first_line(err)}") from err
    bad = non_finite_keys(weights)
    if bad:
        raise ModelLoadError(f"LoRA {path} holds non-finite weights (NaN or Inf) in {bad[:5]}")
    # diffusers logs a failed adapter load as an error and then raises it: the raise is enough.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        pipe.load_lora_weights(folder)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"LoRA {folder} does not fit this pipeline: {_first_line(err)}") from err
    finally:
        diffusers_logging.set_verbosity(verbosity)
