import torch
from diffusers import DDPMScheduler

from ldm_pipeline.presets import SD_NOISE_SCHEDULE
from training.objectives import min_snr_weights, prediction_target


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
