"""Load a saved pipeline from a local folder or a Hub id, with errors that name the problem."""

from __future__ import annotations

import os
import re

import torch

from .pipeline import LatentDiffusionPipeline

# Hub ids are "name" or "owner/name" with letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ValueError):
    """A model folder or Hub id that cannot be loaded; the message says why."""


def load_pipeline(model: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> LatentDiffusionPipeline:
    """Load a `LatentDiffusionPipeline` from a folder or a Hub id through ``from_pretrained``.

    Raises:
        ModelLoadError: the folder is missing or not a pipeline folder, or the Hub id cannot be
            fetched (no network, unknown repository).
    """
    model = str(model)
    if os.path.exists(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ModelLoadError(f"{model} is not a pipeline folder: it has no model_index.json")
    elif not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder not found: {model}")
    try:
        return LatentDiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        where = "folder" if os.path.exists(model) else "Hub id"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"could not load the pipeline from {where} {model!r}: {first_line}") from err


def load_component(cls: type, source: str, subfolder: str, **kwargs):
    """Load one model (e.g. ``AutoencoderKL``) from a folder or Hub id with ``cls.from_pretrained``.

    ``source`` may hold the model itself (``stabilityai/sd-vae-ft-mse``) or a whole pipeline or
    training-run folder, in which case the model is read from its ``subfolder`` (``vae``,
    ``text_encoder``, ...).
    """
    if os.path.isdir(source):
        inside = os.path.isdir(os.path.join(source, subfolder))
        return cls.from_pretrained(source, subfolder=subfolder if inside else None, **kwargs)
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)


def load_component_config(cls: type, source: str, subfolder: str) -> dict:
    """The config of the model `load_component` would load (``cls.load_config``), without weights.

    Raises:
        ModelLoadError: the folder or Hub id holds no such config.
    """
    try:
        if os.path.isdir(source):
            inside = os.path.isdir(os.path.join(source, subfolder))
            return dict(cls.load_config(source, subfolder=subfolder if inside else None))
        if not _HUB_ID.match(source) or source.startswith((".", "/", "~")):
            raise ModelLoadError(f"model folder not found: {source}")
        try:
            return dict(cls.load_config(source))
        except OSError:
            return dict(cls.load_config(source, subfolder=subfolder))
    except (OSError, ValueError) as err:
        if isinstance(err, ModelLoadError):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"could not read the {subfolder} config from {source!r}: {first_line}") from err
