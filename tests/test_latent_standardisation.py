"""The VAE stage's per-channel latent standardisation: folded into the weights, decoding unchanged."""

import pytest
import torch
from ldm_pipeline.training.data import ImageSet, Pixels
from ldm_pipeline.training.vae import latent_statistics, measure_scaling_factor, standardise_latents

from ldm_pipeline.presets import build_vae


def _skewed_vae():
    """The tiny preset's VAE with channels made very unequal (offsets and scales), as trained ones are."""
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= torch.linspace(0.1, 3.0, c).view(-1, 1, 1, 1)
        vae.quant_conv.bias[:c] += torch.linspace(-2.0, 2.0, c)
        vae.quant_conv.bias[c:] = -8.0  # a trained VAE's small posterior std
    return vae


def _images(n=64):
    g = torch.Generator().manual_seed(1)
    return ImageSet([Pixels(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), ["x"] * n)])


@torch.no_grad()
def test_standardised_channels_have_zero_mean_one_std_and_decode_as_before():
    vae, images = _skewed_vae(), _images()
    x = images.buckets[0].float_batch(torch.arange(8))
    z_before = vae.encode(x).latent_dist
    decoded_before = vae.decode(z_before.mean).sample
    mean, std = latent_statistics(vae, images)
    assert std.max() / std.min() > 5 and mean.abs().max() > 1  # the skew the fold removes

    scale = measure_scaling_factor(vae, images, standardise=True)
    new_mean, new_std = latent_statistics(vae, images)
    torch.testing.assert_close(new_mean, torch.zeros_like(new_mean), atol=1e-3, rtol=0)
    rms = std.pow(2).mean().sqrt()
    torch.testing.assert_close(new_std, torch.full_like(new_std, float(rms)), atol=1e-3, rtol=1e-3)
    assert scale == pytest.approx(1 / float(rms))
    z_after = vae.encode(x).latent_dist
    # The same posterior, moved and scaled per channel; the decoder undoes it.
    gain = (rms / std).float().view(1, -1, 1, 1)
    torch.testing.assert_close(z_after.std, z_before.std * gain, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vae.decode(z_after.mean).sample, decoded_before, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_without_standardising_the_scaling_factor_is_one_over_the_overall_std():
    vae, images = _skewed_vae(), _images()
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    scale = measure_scaling_factor(vae, images, standardise=False)
    assert all(torch.equal(weights[k], v) for k, v in vae.state_dict().items())  # weights untouched
    g = torch.Generator().manual_seed(0)
    z = vae.encode(images.buckets[0].float_batch(torch.arange(64))).latent_dist.sample(g)
    assert scale == pytest.approx(1 / z.double().std(unbiased=False).item(), rel=1e-4)


def test_a_vae_without_quant_convs_is_refused():
    vae = build_vae("tiny")
    vae.register_to_config(use_quant_conv=False)
    with pytest.raises(ValueError, match="quant_conv"):
        standardise_latents(vae, torch.zeros(4), torch.ones(4))
