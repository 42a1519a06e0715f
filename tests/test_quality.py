"""Quality-aware stopping: stages measure themselves while they train, stop at their target,
run on to their ceilings when they miss it, and say so with the command that continues them."""

import shlex

import pytest
import torch
from ldm_pipeline.training import loop as loop_module
from ldm_pipeline.training.config import ConfigError, StageConfig, load_config
from ldm_pipeline.training.loop import QualityCheck, make_accelerator, run_loop
from ldm_pipeline.training.quickstart import quickstart_config
from ldm_pipeline.training.run import quality_summary, train

from ldm_pipeline.cli import main


def _one_weight_model():
    """An accelerator with a one-weight model and its SGD optimiser (LR 1), prepared."""
    accelerator = make_accelerator("auto", seed=0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return accelerator, *accelerator.prepare(model, optimizer)


def _loop(
    cfg: StageConfig, values: list[float] | None, target: float | None, every: int = 2, decay_at: float | None = None
):
    """run_loop on a one-weight model (SGD at LR 1) with a check that returns ``values`` in turn
    (None: no check)."""
    accelerator, model, optimizer = _one_weight_model()
    feed = iter(values or [])
    check = QualityCheck("score", lambda: next(feed), every, target, decay_at) if values is not None else None
    loss = lambda step: {"loss": model(torch.ones(1, 2)).sum() * 0}  # noqa: E731
    return run_loop(accelerator, model, optimizer, loss, cfg, desc="t", quality=check, log_every=1)


def test_loop_stops_at_the_first_measurement_that_reaches_the_target(capsys):
    result = _loop(StageConfig(steps=100, warmup_steps=0), [0.1, 0.5, 0.91, 0.95], target=0.9)
    assert result.steps == 6 and result.stopped_by == "target" and result.reached is True
    assert [(q["step"], q["value"]) for q in result.quality] == [(2, 0.1), (4, 0.5), (6, 0.91)]
    printed = capsys.readouterr().out
    assert "t: step 4: score 0.500 (target 0.900)" in printed and "target reached at step 6" in printed


def test_loop_runs_to_its_step_ceiling_when_the_target_is_missed():
    # Measured every 4 steps and once more at the end (step 10).
    result = _loop(StageConfig(steps=10, warmup_steps=0), [0.1, 0.2, 0.3], target=0.9, every=4)
    assert result.steps == 10 and result.stopped_by == "steps" and result.reached is False
    assert [q["step"] for q in result.quality] == [4, 8, 10]


def test_loop_runs_to_its_time_ceiling_when_the_target_is_missed(monkeypatch):
    ticks = iter(range(0, 100_000, 10))  # ten seconds a call: a minute within a few steps
    monkeypatch.setattr("ldm_pipeline.training.loop.time.monotonic", lambda: next(ticks))
    result = _loop(StageConfig(steps=None, warmup_steps=0, max_minutes=1), [0.0] * 100, target=0.9)
    assert result.stopped_by == "minutes" and result.reached is False and result.steps < 20


def test_a_measure_without_a_target_never_stops_the_loop():
    result = _loop(StageConfig(steps=6, warmup_steps=0), [1.0, 1.0, 1.0], target=None)
    assert result.steps == 6 and result.reached is None and len(result.quality) == 3


def test_a_check_with_parts_stops_only_when_every_measure_reaches_its_target(capsys):
    accelerator, model, optimizer = _one_weight_model()
    # (main value, part) in turn: the main value is reached first, the part two checks later;
    # with a window of two the means reach 0.9 and 0.5 at the fourth check (0.92, 0.55).
    feed = iter([(0.5, 0.1), (0.95, 0.2), (0.9, 0.45), (0.94, 0.65), (1.0, 1.0)])
    check = QualityCheck(
        "r", lambda: dict(zip(("r", "tone"), next(feed), strict=True)), 2, 0.9, window=2, parts={"tone": 0.5}
    )
    loss = lambda step: {"loss": model(torch.ones(1, 2)).sum() * 0}  # noqa: E731
    result = run_loop(
        accelerator, model, optimizer, loss, StageConfig(steps=100, warmup_steps=0), desc="t", quality=check
    )
    assert result.steps == 8 and result.stopped_by == "target" and result.reached is True
    assert [q["tone"] for q in result.quality] == [0.1, 0.2, 0.45, 0.65]
    assert "t: step 4: r 0.950, tone 0.200 (target 0.900, tone 0.500)" in capsys.readouterr().out
    report = result.quality_report(check)
    assert report["quality_parts"] == {"tone": pytest.approx(0.55)} and report["part_targets"] == {"tone": 0.5}
    assert not QualityCheck("r", None, 2, 0.9, parts={"tone": None}).reached([{"value": 0.8, "tone": 1.0}])
    assert QualityCheck("r", None, 2, 0.9, parts={"tone": None}).reached([{"value": 0.9, "tone": 0.0}])  # no target


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["vae.target=30"], "vae.target: needs vae.eval_every"),
        (["unet.held_out_target=0.8", "unet.target=0.9", "unet.eval_every=10"], "held_out_target.*emoji"),
        (["unet.held_out_target=1.8", "unet.target=0.9", "unet.eval_every=10"], r"fraction in \(0, 1\]"),
        (["data.name=emoji", "unet.eval_every=10", "clip.pretrained=a/clip"], "run's own CLIP model"),
        (["unet.target=0.9"], "unet.target: needs unet.eval_every"),
        (["vae.target=30", "vae.eval_every=10", "data.holdout=0"], "set data.holdout > 0"),
        (["vae.eval_every=10", "data.holdout=0"], "set data.holdout > 0"),  # a measure alone needs it too
        (["unet.target=1.5", "unet.eval_every=10"], r"fraction in \(0, 1\]"),
        (["unet.target=0.9", "unet.eval_every=10", "data.source=some/folder"], "not data.source"),
        (["unet.eval_every=0"], "unet.eval_every: must be positive"),
    ],
)
def test_targets_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        quickstart_config(smoke=True, overrides=overrides)


@pytest.mark.slow
def test_stages_measure_quality_and_report_a_missed_target_with_a_command_that_continues_it(tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [
        "vae.steps=4",
        "vae.eval_every=2",
        "vae.target=99",  # unreachable: the stage runs to its ceiling
        "unet.steps=4",
        "unet.eval_every=2",
        "unet.quality_prompts=3",
        "unet.target=0.001",  # reached at the first measurement unless nothing is right
    ]
    cfg = quickstart_config(smoke=True, overrides=overrides)
    report = train(cfg, out)
    vae, unet = report["vae"], report["unet"]
    assert [q["step"] for q in vae["quality_curve"]] == [2, 4]
    assert all(0 < q["value"] < 99 for q in vae["quality_curve"])  # PSNR in dB
    assert vae["target_reached"] is False and vae["stopped_by"] == "steps"
    assert 0 <= unet["quality"] <= 1 and unet["quality_metric"] == "adherence"

    lines = quality_summary(report, cfg, out)
    missed = next(line for line in lines if line.startswith("vae:"))
    assert "NOT DONE" in missed and "below the target 99.00 dB" in missed
    command = shlex.split(missed.split("Continue it (the stages after it train again) with: ")[1])
    assert command[:2] == ["ldm", "train"] and "vae.steps=8" in command
    capsys.readouterr()
    # The printed command continues the VAE from its last checkpoint to the doubled ceiling.
    assert main(command[1:] + ["report_to=none"]) == 0
    printed = capsys.readouterr().out
    assert "vae: NOT DONE: psnr" in printed and "at step 8 " in printed


def test_warmup_stable_decay_starts_its_decay_at_the_quality_it_was_told():
    cfg = StageConfig(steps=40, warmup_steps=2, lr_scheduler="warmup_stable_decay", decay_fraction=0.5, lr_floor=0.1)
    result = _loop(cfg, [0.2, 0.4, 0.6, 0.7] + [0.8] * 20, target=None, decay_at=0.6)
    lrs = [e["lr"] for e in result.losses]  # lrs[i]: the LR after update i + 1
    assert lrs[0] == 0.5 and lrs[1:6] == [1.0] * 5  # warm-up, then stable until 0.6 at step 6
    assert lrs[6] == pytest.approx(1 - 0.9 / 3) and lrs[8] == pytest.approx(0.1)  # 3 updates of decay
    assert lrs[-1] == pytest.approx(0.1)  # then the floor


def test_warmup_stable_decay_decays_into_a_step_ceiling():
    cfg = StageConfig(steps=20, warmup_steps=0, lr_scheduler="warmup_stable_decay", decay_fraction=0.25, lr_floor=0.0)
    lrs = [e["lr"] for e in _loop(cfg, None, target=None).losses]
    # 16 stable updates, then the last 20 - 16 = 4 decay to 0 (16 + 0.25 * 16 >= 20).
    assert lrs[:16] == [1.0] * 16 and lrs[16] == pytest.approx(0.75) and lrs[-1] == pytest.approx(0.0)


def test_the_progress_bar_estimate_counts_the_quality_checks_as_well_as_the_steps(monkeypatch):
    # A clock that moves 1 s a step and 10 s a check (every 5 steps): the true time left after
    # step n of 40 is (40 - n) s of steps plus 10 s for each check still to come.
    clock = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])
    estimates: list[tuple[int, float]] = []

    class Recording(loop_module.tqdm):
        def update(self, n=1):
            super().update(n)
            d = self.format_dict  # what tqdm prints: its rate, else the mean rate since the start
            rate = d["rate"] or (d["n"] - d["initial"]) / d["elapsed"]
            estimates.append((d["n"], (d["total"] - d["n"]) / rate))

    monkeypatch.setattr(loop_module, "tqdm", Recording)
    accelerator, model, optimizer = _one_weight_model()

    def loss(step):
        clock[0] += 1.0
        return {"loss": model(torch.ones(1, 2)).sum() * 0}

    def measure():
        clock[0] += 10.0
        return 0.0

    check = QualityCheck("score", measure, 5, None)
    run_loop(accelerator, model, optimizer, loss, StageConfig(steps=40, warmup_steps=0), desc="t", quality=check)
    assert len(estimates) == 40
    # Once two checks have been seen, the mean pace is off by at most 18 % of the run's 130 s (it
    # runs low just before a check); the last few steps' pace was 34 % high just after one.
    for n, estimate in estimates[10:-1]:
        truth = (40 - n) + 10 * (40 // 5 - n // 5)
        assert abs(estimate - truth) <= 0.2 * 130, (n, estimate, truth)


@pytest.mark.slow
def test_the_continue_command_keeps_the_overrides_the_run_was_started_with(tmp_path, capsys):
    out = tmp_path / "run"
    overrides = ["stages=[vae]", "vae.steps=2", "vae.eval_every=2", "vae.target=99", "report_to=none"]
    assert main(["train", "tiny", "--output", str(out), *overrides]) == 0
    missed = next(line for line in capsys.readouterr().out.splitlines() if "NOT DONE" in line)
    command = shlex.split(missed.split("with: ")[1])
    assert command[:3] == ["ldm", "train", str(out / "config.yaml")]  # it holds the overrides, "tiny" does not
    resolved = load_config(out / "config.yaml")
    assert resolved.vae.target == 99 and resolved.stages == ["vae"]
