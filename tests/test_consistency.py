"""Latent consistency distillation's maths against diffusers' schedulers (training/consistency.py)."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from ldm_pipeline.training.consistency import (
    SkippingSolver,
    boundary_scalings,
    consistency_loss,
    consistency_output,
    guided,
    predicted_noise,
    predicted_origin,
)

SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def test_boundary_scalings_are_the_lcm_schedulers_and_fix_the_boundary():
    lcm = LCMScheduler(**SCHEDULE)
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t)
    for i, step in enumerate(t.tolist()):
        skip, out = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(skip, rel=1e-6) and c_out[i].item() == pytest.approx(out, abs=1e-7)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_consistency_function_is_the_identity_at_the_boundary(kind):
    """f(x, 0) = x whatever the network says: a student and its target agree there, so their loss is zero."""
    schedule = LCMScheduler(**SCHEDULE).alphas_cumprod
    x, student, target = torch.randn(3, 2, 4, 8, 8)
    t = torch.zeros(2, dtype=torch.int64)
    f_student = consistency_output(student, t, x, schedule, kind)
    f_target = consistency_output(target, t, x, schedule, kind)
    assert torch.equal(f_student, x)
    assert consistency_loss(f_student, f_target, "huber", 0.001).abs().max().item() < 1e-6
    assert consistency_loss(f_student, f_target, "l2", 0.001).abs().max().item() == 0


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_skipping_step_is_diffusers_ddim_step(kind):
    ddim = DDIMScheduler(**SCHEDULE, prediction_type=kind, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(50)
    solver = SkippingSolver.from_schedule(ddim, 50)
    assert solver.timesteps[[0, 1, -1]].tolist() == [19, 39, 999] and solver.skip == 20
    torch.manual_seed(0)
    for index in (0, 1, 24, 49):
        x_t, output = torch.randn(2, 1, 4, 8, 8)
        t = solver.timesteps[index].repeat(1)
        x0 = predicted_origin(output, t, x_t, solver.alphas_cumprod, kind)
        eps = predicted_noise(output, t, x_t, solver.alphas_cumprod, kind)
        ours = solver.step(x0, eps, torch.tensor([index]))
        theirs = ddim.step(output, int(t), x_t, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert solver.previous(torch.tensor([0, 1, 49])).tolist() == [0, 19, 979]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_what_training_targets_is_what_the_lcm_scheduler_samples(kind):
    lcm = LCMScheduler(**SCHEDULE, prediction_type=kind)
    lcm.set_timesteps(4)
    x_t, output = torch.randn(2, 1, 4, 8, 8)
    t = lcm.timesteps[0]
    denoised = lcm.step(output, t, x_t, return_dict=True).denoised
    ours = consistency_output(output, t.repeat(1), x_t, lcm.alphas_cumprod, kind)
    torch.testing.assert_close(ours, denoised, rtol=1e-5, atol=1e-5)


def test_guidance_and_losses_by_hand():
    cond, uncond = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert guided(cond, uncond, torch.tensor([0.0, 3.0]))[:, 0, 0, 0].tolist() == [1.0, 4.0]
    pred, target = torch.zeros(1, 4), torch.full((1, 4), 0.3)
    assert consistency_loss(pred, target, "l2", 0.001).item() == pytest.approx(0.09)
    assert consistency_loss(pred, target, "huber", 0.1).item() == pytest.approx((0.09 + 0.01) ** 0.5 - 0.1)
    with pytest.raises(ValueError, match="unknown consistency loss 'l1'"):
        consistency_loss(pred, target, "l1", 0.1)
