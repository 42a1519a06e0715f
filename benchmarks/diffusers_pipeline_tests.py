"""Run diffusers' own Stable Diffusion pipeline tests against LatentDiffusionPipeline, beside stock.

diffusers' ``tests/`` are not in its wheel or sdist, so they come from a diffusers source tree:
``--source PATH`` (a checkout, ideally at the installed version's tag), else a shallow
``git clone --branch v<installed version>`` of github.com/huggingface/diffusers into a temporary
folder. Nothing is copied into this repository. Without a source (offline, as in CI) the script
says so and exits 0.

It writes, in a temporary folder, one test module that subclasses diffusers'
``StableDiffusionPipelineFastTests`` (the pipeline mixins of ``tests/pipelines/
test_pipelines_common.py`` on tiny components built in code) with ``pipeline_class =
LatentDiffusionPipeline``, runs it and stock's class with pytest, and reports the tests that pass
for stock and fail for ours (and the reverse). JSON with ``--out``.

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

MODULE = """
import sys
sys.path.insert(0, {source!r})
from tests.pipelines.stable_diffusion.test_stable_diffusion import StableDiffusionPipelineFastTests as _Stock

from ldm_pipeline import LatentDiffusionPipeline


class TestStock(_Stock):
    pass


class TestOurs(_Stock):
    pipeline_class = LatentDiffusionPipeline

    def get_dummy_components(self, *args, **kwargs):
        components = super().get_dummy_components(*args, **kwargs)
        for name in ("safety_checker", "requires_safety_checker"):  # ours has no safety checker
            components.pop(name, None)
        return components
"""


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
    """``{"TestStock"|"TestOurs": {test name: outcome}}`` from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    out: dict[str, dict[str, str]] = {"TestStock": {}, "TestOurs": {}}
    for case in ET.parse(report).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        if cls not in out:
            continue
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        out[cls][case.get("name")] = outcome
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
        (work / "test_ldm_mixins.py").write_text(textwrap.dedent(MODULE.format(source=str(source))))
        report = work / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(work / "test_ldm_mixins.py")]
        command += ["--junitxml", str(report), "--rootdir", str(work)] + (["-k", args.k] if args.k else [])
        subprocess.run(command, cwd=work, check=False)
        outcomes = _outcomes(report)
    stock, ours = outcomes["TestStock"], outcomes["TestOurs"]
    result = {
        "tests_version": version,
        "installed_version": diffusers.__version__,
        "stock": {k: sum(v == k for v in stock.values()) for k in ("passed", "failed", "skipped")},
        "ours": {k: sum(v == k for v in ours.values()) for k in ("passed", "failed", "skipped")},
        "pass_for_stock_fail_for_ours": _failed_here_passed_there(ours, stock),
        "pass_for_ours_fail_for_stock": _failed_here_passed_there(stock, ours),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
