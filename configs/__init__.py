"""The shipped run configs, installed as package data (``ldm_pipeline.configs``): ``shipped(name)``."""

from importlib.resources import files
from pathlib import Path


def shipped(name: str) -> Path:
    """The path of a shipped config file, e.g. ``shipped("shapes.yaml")``."""
    path = Path(str(files(__name__) / name))
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config named {name} (in {path.parent})")
    return path
