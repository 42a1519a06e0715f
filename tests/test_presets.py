import pytest
import torch
from accelerate import init_empty_weights

from ldm_pipeline import PRESETS, build_pipeline, get_preset
from ldm_pipeline.presets import build_scheduler, build_text_encoder, build_unet, build_vae


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_known_presets_and_unknown_name():
    assert {"tiny", "shapes", "sd15"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny"):
        get_preset("huge")


def test_tiny_pipeline_components_fit_together():
    pipe = build_pipeline("tiny")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 16
    assert pipe.vae.config.scaling_factor == 1.0


def test_default_noise_schedule_and_sampler():
    sched = build_scheduler("shapes")
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    assert sched.config.algorithm_type == "dpmsolver++"
    assert (sched.config.beta_schedule, sched.config.beta_start, sched.config.beta_end) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert sched.config.num_train_timesteps == 1000
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    torch.testing.assert_close(sched.betas, expected)


def test_shapes_preset_works_at_32_pixels():
    p = get_preset("shapes")
    unet = build_unet(p)
    assert p.resolution == 32 and unet.config.sample_size * 2 ** (len(p.vae.channels) - 1) == 32
    out = unet(torch.randn(2, 8, 8, 8), 10, encoder_hidden_states=torch.randn(2, 24, 128)).sample
    assert out.shape == (2, 8, 8, 8)


def test_sd15_preset_matches_stable_diffusion_sizes():
    # Built on the meta device: the architecture without allocating 1B parameters.
    with init_empty_weights():
        unet, vae, text = build_unet("sd15"), build_vae("sd15"), build_text_encoder("sd15")
    # Parameter counts of the released Stable Diffusion 1.5 components.
    assert _params(unet) == 859_520_964
    assert _params(vae) == 83_653_863
    assert _params(text) == 123_060_480
    assert unet.config.sample_size == 64 and unet.config.cross_attention_dim == 768
