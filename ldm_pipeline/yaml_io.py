"""YAML as people write it: ``1e-4`` is a number, and a syntax error names its file, line and column.

PyYAML implements YAML 1.1, whose float needs a dot and a signed exponent (``1.0e-4``): the
``1e-4`` nearly everyone writes for a learning rate comes back as the string ``'1e-4'``. YAML 1.2
(2009) reads it as a float; `Loader` adds that one rule to PyYAML's safe loader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads YAML 1.2 floats without a dot (``1e-4``, ``5E3``) and refuses
    a key given twice in one mapping (PyYAML keeps the last one silently; YAML forbids it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key_node.value!r} is given twice", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class YAMLSyntaxError(InputError):
    """Text that is not YAML; the message is one line with the place and the problem."""


def parse_yaml(text: str, where: str) -> Any:
    """Parse ``text`` with `Loader`; ``where`` names it in errors (a file, or ``override x=y``)."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        place = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(filter(None, [err.context, err.problem]))
        raise YAMLSyntaxError(f"{where}{place}: not valid YAML: {problem}") from err
    except yaml.YAMLError as err:
        raise YAMLSyntaxError(f"{where}: not valid YAML: {' '.join(str(err).split())}") from err


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file (UTF-8) with `Loader`.

    Raises:
        YAMLSyntaxError: not valid YAML, or not UTF-8 text.
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise YAMLSyntaxError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at {err.start})") from err
    return parse_yaml(text, str(path))
