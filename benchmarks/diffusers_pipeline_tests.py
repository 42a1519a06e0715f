"""Run diffusers' own Stable Diffusion pipeline tests against LatentDiffusionPipeline, beside stock.

diffusers' ``tests/`` are not in its wheel or sdist, so they come from a diffusers source tree:
``--source PATH`` (a checkout, ideally at the installed version's tag), else a shallow
``git clone --branch v<installed version>`` of github.com/huggingface/diffusers into a temporary
folder. Nothing is copied into this repository. Without a source (offline, as in CI) the script
says so and exits 0.

It writes, in a temporary folder, one test module that subclasses each of stock Stable Diffusion's
fast test classes (``CLASSES`` below: the pipeline mixins of ``tests/pipelines/testing_utils/`` on
tiny components built in code, the IP-Adapter and memory mixins, and the PEFT LoRA tests of
``tests/lora/``) twice: as they are, and with ``pipeline_class = LatentDiffusionPipeline``. It runs
both with pytest and reports the tests that pass for stock and fail for ours (and the reverse).
JSON with ``--out``. diffusers' tests need ``pip install parameterized`` beside the project's dev
extra; a test module that does not import is reported under ``modules_not_imported``.

Usage::

    python benchmarks/diffusers_pipeline_tests.py [--source ~/src/diffusers] [--out results.json] [-k expr]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import diffusers

REPO = "https://github.com/huggingface/diffusers"

# The test module written for the run. diffusers' dummy components load a tiny tokenizer (and, for the
# LoRA tests, a tiny text encoder) from hf-internal-testing / peft-internal-testing on the Hub; offline
# these become a character-level CLIP tokenizer (ids under 1,000, as the tiny text encoders' vocabularies
# need) and a seeded tiny CLIP text encoder, given to stock and ours alike. Tests that compare against
# slices recorded with the Hub's tokenizer therefore fail for both, and are not counted against ours.
MODULE = """
import importlib
import sys

sys.path.insert(0, {source!r})
import diffusers.pipelines
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm_pipeline import LatentDiffusionPipeline

_HUB_TEST_REPOS = ("hf-internal-testing/", "peft-internal-testing/")


def _tiny_tokenizer():
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    vocab = {{t: i for i, t in enumerate(tokens)}}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77, **special)


class OfflineTokenizer(CLIPTokenizer):
    @classmethod
    def from_pretrained(cls, name, *args, **kwargs):
        if str(name).startswith(_HUB_TEST_REPOS):
            return _tiny_tokenizer()
        return CLIPTokenizer.from_pretrained(name, *args, **kwargs)


class OfflineTextModel(CLIPTextModel):
    @classmethod
    def from_pretrained(cls, name, *args, **kwargs):
        if str(name).startswith(_HUB_TEST_REPOS):
            torch.manual_seed(0)
            config = CLIPTextConfig(
                bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_size=32,
                intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, layer_norm_eps=1e-5,
            )
            return CLIPTextModel(config)
        return CLIPTextModel.from_pretrained(name, *args, **kwargs)


def _ours(base):
    class Ours(base):
        pipeline_class = LatentDiffusionPipeline

        def get_dummy_components(self, *args, **kwargs):
            components = super().get_dummy_components(*args, **kwargs)
            if isinstance(components, dict):  # ours has no safety checker
                for name in ("safety_checker", "requires_safety_checker"):
                    components.pop(name, None)
            return components

    return Ours


# diffusers' encode_prompt test reads the method's source through `diffusers.pipelines.<class name>`,
# where diffusers' own pipelines live; ours is made reachable there for the run.
diffusers.pipelines.LatentDiffusionPipeline = LatentDiffusionPipeline


def _add_classes(module_name, class_names):
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # e.g. a test-only dependency such as `parameterized` missing
        with open({errors!r}, "a") as file:
            file.write(f"{{module_name}}: {{error!r}}\\n")
        return
    module.CLIPTokenizer = OfflineTokenizer
    for name in class_names:
        base = getattr(module, name, None)
        if base is None:
            continue
        if hasattr(base, "tokenizer_cls"):
            base = type(name, (base,), dict(tokenizer_cls=OfflineTokenizer, text_encoder_cls=OfflineTextModel))
        globals()["TestStock_" + name] = type("TestStock_" + name, (base,), {{}})
        globals()["TestOurs_" + name] = type("TestOurs_" + name, (_ours(base),), {{}})


for _module_name, _class_names in {classes!r}.items():
    _add_classes(_module_name, _class_names)
"""

# Stock Stable Diffusion's test classes, in diffusers' pytest layout (0.40 on) and its older unittest one.
CLASSES = {
    "tests.pipelines.stable_diffusion.test_stable_diffusion": [
        "TestStableDiffusionPipeline",
        "TestStableDiffusionPipelineMemory",
        "TestStableDiffusionPipelineIPAdapter",
        "StableDiffusionPipelineFastTests",
    ],
    "tests.lora.test_lora_layers_sd": ["StableDiffusionLoRATests"],
}


def _source(path: Path | None, workdir: Path) -> Path | None:
    if path is not None:
        return path if (path / "tests" / "pipelines" / "test_pipelines_common.py").is_file() else None
    tag = f"v{diffusers.__version__}"
    clone = workdir / "diffusers"
    done = subprocess.run(
        ["git", "clone", "--quiet", "--depth", "1", "--branch", tag, REPO, str(clone)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return clone if done.returncode == 0 else None


def _outcomes(report: Path) -> dict[str, dict[str, str]]:
    """``{"stock"|"ours": {"<diffusers class>::<test>": outcome}}`` from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    out: dict[str, dict[str, str]] = {"stock": {}, "ours": {}}
    for case in ET.parse(report).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        side, _, base = cls.partition("_")
        if side not in ("TestStock", "TestOurs"):
            continue
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        out["stock" if side == "TestStock" else "ours"][f"{base}::{case.get('name')}"] = outcome
    return out


def _failed_here_passed_there(here: dict[str, str], there: dict[str, str]) -> list[str]:
    return sorted(name for name, outcome in here.items() if outcome == "failed" and there.get(name) == "passed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="a diffusers source tree (with tests/)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("-k", default=None, help="pytest -k expression")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = _source(args.source, work)
        if source is None:
            print(f"skipped: no diffusers source tree with tests/ (give --source, or network to {REPO})")
            return
        version = "unknown"
        init = source / "src" / "diffusers" / "__init__.py"
        if init.is_file():
            version = next((ln.split('"')[1] for ln in init.read_text().splitlines() if "__version__" in ln), version)
        if version != diffusers.__version__:
            print(f"note: the tests are diffusers {version}'s, the installed library is {diffusers.__version__}")
        errors = work / "import_errors.txt"
        module = MODULE.format(source=str(source), classes=CLASSES, errors=str(errors))
        (work / "test_ldm_mixins.py").write_text(textwrap.dedent(module))
        report = work / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(work / "test_ldm_mixins.py")]
        command += ["--junitxml", str(report), "--rootdir", str(work)] + (["-k", args.k] if args.k else [])
        subprocess.run(command, cwd=work, check=False)
        outcomes = _outcomes(report)
        import_errors = sorted(set(errors.read_text().splitlines())) if errors.is_file() else []
    for line in import_errors:
        print(f"not run: cannot import {line}")
    stock, ours = outcomes["stock"], outcomes["ours"]
    if not stock or not ours:
        raise SystemExit("no tests ran for stock or for ours: see pytest's output above")
    result = {
        "tests_version": version,
        "installed_version": diffusers.__version__,
        "stock": {k: sum(v == k for v in stock.values()) for k in ("passed", "failed", "skipped")},
        "ours": {k: sum(v == k for v in ours.values()) for k in ("passed", "failed", "skipped")},
        "pass_for_stock_fail_for_ours": _failed_here_passed_there(ours, stock),
        "pass_for_ours_fail_for_stock": _failed_here_passed_there(stock, ours),
        "modules_not_imported": import_errors,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
