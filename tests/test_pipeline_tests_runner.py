"""benchmarks/diffusers_pipeline_tests.py: runs a diffusers test class for stock and for ours, and
reports what passes for one and fails for the other; skips cleanly without a source tree."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "diffusers_pipeline_tests.py"

# A stand-in for diffusers' tests/: one class with a test stock passes and ours fails (ours has no
# safety checker), one both pass, one module that cannot import.
FAKE_TEST = """
from diffusers import StableDiffusionPipeline


class TestStableDiffusionPipeline:
    pipeline_class = StableDiffusionPipeline

    def get_dummy_components(self):
        return {"safety_checker": None, "unet": None}

    def test_has_a_safety_checker(self):
        import inspect
        assert "safety_checker" in inspect.signature(self.pipeline_class.__init__).parameters

    def test_components_lose_the_safety_checker_for_ours_only(self):
        components = self.get_dummy_components()
        assert ("safety_checker" in components) == (self.pipeline_class is StableDiffusionPipeline)
"""


def _fake_source(root: Path) -> Path:
    (root / "tests" / "pipelines" / "stable_diffusion").mkdir(parents=True)
    (root / "tests" / "lora").mkdir()
    for folder in ("tests", "tests/pipelines", "tests/pipelines/stable_diffusion", "tests/lora"):
        (root / folder / "__init__.py").write_text("")
    (root / "tests" / "pipelines" / "test_pipelines_common.py").write_text("")
    (root / "tests" / "pipelines" / "stable_diffusion" / "test_stable_diffusion.py").write_text(FAKE_TEST)
    (root / "tests" / "lora" / "test_lora_layers_sd.py").write_text("import a_module_that_is_not_installed\n")
    return root


def test_reports_what_passes_for_stock_and_fails_for_ours(tmp_path):
    out = tmp_path / "result.json"
    source = _fake_source(tmp_path / "diffusers")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--source", str(source), "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["pass_for_stock_fail_for_ours"] == ["TestStableDiffusionPipeline::test_has_a_safety_checker"]
    assert result["pass_for_ours_fail_for_stock"] == []
    assert result["stock"] == {"passed": 2, "failed": 0, "skipped": 0}
    assert result["ours"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert [line.split(":")[0] for line in result["modules_not_imported"]] == ["tests.lora.test_lora_layers_sd"]
    assert "not run: cannot import tests.lora.test_lora_layers_sd" in done.stdout


def test_skips_cleanly_without_a_source_tree(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--source", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    assert "skipped: no diffusers source tree" in done.stdout


def test_outcomes_are_read_per_side_from_pytests_report(tmp_path):
    spec = importlib.util.spec_from_file_location("runner", SCRIPT)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    report = tmp_path / "report.xml"
    report.write_text(
        '<testsuites><testsuite><testcase classname="test_ldm_mixins.TestStock_X" name="test_a"/>'
        '<testcase classname="test_ldm_mixins.TestOurs_X" name="test_a"><failure/></testcase>'
        '<testcase classname="test_ldm_mixins.TestOurs_X" name="test_b"><skipped/></testcase>'
        '<testcase classname="test_ldm_mixins._base" name="test_c"/></testsuite></testsuites>'
    )
    assert runner._outcomes(report) == {
        "stock": {"X::test_a": "passed"},
        "ours": {"X::test_a": "failed", "X::test_b": "skipped"},
    }
