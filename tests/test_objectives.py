import pytest
import torch
from diffusers import DDPMScheduler
from ldm_pipeline.training.objectives import (
    denoising_loss,
    immiscible_noise,
    min_snr_weights,
    nearest_noise,
    offset_noise,
    perturbed_noise,
    prediction_target,
    sample_timesteps,
    zero_terminal_snr_config,
)

from ldm_pipeline.presets import SD_NOISE_SCHEDULE


def _sched(kind="epsilon"):
    return DDPMScheduler(**SD_NOISE_SCHEDULE, prediction_type=kind)


def test_targets_by_hand():
    s = _sched()
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    assert torch.equal(prediction_target(s, x0, noise, t, "epsilon"), noise)
    a = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - s.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(prediction_target(s, x0, noise, t, "v_prediction"), a * noise - sigma * x0)


def test_min_snr_weights_by_hand():
    s = _sched()
    t = torch.tensor([10, 500, 990])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    assert snr[0] > 5 > snr[2]
    eps = min_snr_weights(s, t, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.stack([5 / snr[0], snr[1].clamp(max=5) / snr[1], torch.tensor(1.0)]))
    v = min_snr_weights(s, t, 5.0, "v_prediction")
    torch.testing.assert_close(v, snr.clamp(max=5) / (snr + 1))


def test_sample_prediction_and_its_min_snr_weight():
    s = _sched("sample")
    x0, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 990])
    assert torch.equal(prediction_target(s, x0, noise, t, "sample"), x0)
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    torch.testing.assert_close(min_snr_weights(s, t, 5.0, "sample"), snr.clamp(max=5))


def test_offset_noise_shifts_each_channel_by_one_draw():
    noise = torch.zeros(2, 3, 4, 4)
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    shift = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, (0.1 * shift)[..., None, None].expand(2, 3, 4, 4))
    assert offset_noise(noise, 0.0) is noise


def test_input_perturbation_adds_scaled_fresh_noise():
    noise = torch.ones(2, 3, 4, 4)
    out = perturbed_noise(noise, 0.1, torch.Generator().manual_seed(1))
    xi = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, 1 + 0.1 * xi)


def test_zero_terminal_snr_rescales_sqrt_alpha_bar_by_hand():
    base, zero = (
        _sched("v_prediction"),
        DDPMScheduler(**SD_NOISE_SCHEDULE, prediction_type="v_prediction", **zero_terminal_snr_config()),
    )
    a = base.alphas_cumprod.sqrt().double()
    # Lin et al. 2024, algorithm 1: shift so the last is 0, scale so the first is unchanged.
    expected = (a - a[-1]) * a[0] / (a[0] - a[-1])
    torch.testing.assert_close(zero.alphas_cumprod.sqrt().double(), expected, atol=1e-6, rtol=1e-5)
    assert zero.alphas_cumprod[-1] == 0 and zero.config.timestep_spacing == "trailing"


def test_timestep_range_and_huber_loss_by_hand():
    t = sample_timesteps(1000, 200, 300, torch.Generator().manual_seed(0))
    assert t.min() >= 200 and t.max() < 300 and len(t.unique()) > 50
    pred, target = torch.tensor([[0.0, 0.05, 1.0]]), torch.zeros(1, 3)
    # Huber with δ = 0.1: ½e² within δ, δ(|e| − ½δ) beyond.
    expected = (0 + 0.5 * 0.05**2 + 0.1 * (1.0 - 0.05)) / 3
    torch.testing.assert_close(denoising_loss(pred, target, "huber", 0.1), torch.tensor([expected]))
    torch.testing.assert_close(denoising_loss(pred, target, "mse"), torch.tensor([(0.05**2 + 1) / 3]))


def test_logit_normal_timesteps_crowd_the_middle_of_the_range():
    def draw(density, **kw):
        return sample_timesteps(20000, 100, 900, torch.Generator().manual_seed(0), density, **kw)

    uniform, mid = draw("uniform"), draw("logit_normal")
    assert mid.min() >= 100 and mid.max() < 900
    # sigmoid(N(0, 1)) has about 0.39 of its mass in (0.375, 0.625), against 0.25 for uniform.
    middle = lambda t: ((t >= 400) & (t < 600)).float().mean().item()  # noqa: E731
    assert abs(middle(uniform) - 0.25) < 0.02 and abs(middle(mid) - 0.39) < 0.02
    # A positive mean moves the mass towards the noisy end; the draw is reproducible.
    assert draw("logit_normal", logit_mean=1.0).float().mean() > mid.float().mean() + 100
    assert torch.equal(mid, draw("logit_normal"))
    with pytest.raises(ValueError, match="timestep density"):
        draw("cosine")


def test_immiscible_noise_is_the_least_distance_pairing_of_the_same_draws():
    import itertools

    torch.manual_seed(0)
    z0, noise = torch.randn(5, 4, 2, 2) + 2, torch.randn(5, 4, 2, 2)
    paired = immiscible_noise(z0, noise)
    # The same draws, each used once.
    assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))

    def total(order):
        return sum(float((z0[i] - noise[j]).norm()) for i, j in enumerate(order))

    best = min(total(order) for order in itertools.permutations(range(5)))
    assert float((z0 - paired).flatten(1).norm(dim=1).sum()) == pytest.approx(best)
    assert best < total(range(5))  # the i.i.d. pairing is not already the best one here


def test_nearest_noise_picks_each_latents_nearest_draw_whatever_the_batch_split():
    torch.manual_seed(0)
    z0, candidates = torch.randn(6, 4, 2, 2), torch.randn(3, 6, 4, 2, 2)
    chosen = nearest_noise(z0, candidates)
    for i in range(6):
        distances = [float((candidates[k, i] - z0[i]).norm()) for k in range(3)]
        assert torch.equal(chosen[i], candidates[min(range(3), key=distances.__getitem__), i])
    assert torch.equal(nearest_noise(z0[2:4], candidates[:, 2:4]), chosen[2:4])
