import numpy as np
import pytest
import torch
from conftest import seeded
from PIL import Image

PROMPT = "a red circle on a white background"


def test_default_size_comes_from_unet_and_vae(pipe):
    assert pipe.vae_scale_factor == 2
    assert pipe.default_size == pipe.unet.config.sample_size * 2 == 32
    image = pipe(PROMPT, num_inference_steps=2).images[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)


@pytest.mark.parametrize(
    ("output_type", "check"),
    [
        ("pil", lambda x: isinstance(x, list) and isinstance(x[0], Image.Image) and x[0].size == (32, 32)),
        ("np", lambda x: isinstance(x, np.ndarray) and x.shape == (1, 32, 32, 3) and 0 <= x.min() <= x.max() <= 1),
        ("pt", lambda x: torch.is_tensor(x) and x.shape == (1, 3, 32, 32) and 0 <= x.min() <= x.max() <= 1),
        ("latent", lambda x: torch.is_tensor(x) and x.shape == (1, 4, 16, 16)),
    ],
)
def test_output_types(pipe, output_type, check):
    assert check(pipe(PROMPT, num_inference_steps=2, output_type=output_type).images)


def test_batch_and_num_images_per_prompt(pipe):
    out = pipe([PROMPT, "a blue square"], num_images_per_prompt=3, num_inference_steps=2, output_type="np")
    assert out.images.shape == (6, 32, 32, 3)
    (images,) = pipe(PROMPT, height=16, width=24, num_inference_steps=2, output_type="pt", return_dict=False)
    assert images.shape == (1, 3, 16, 24)


def test_seeded_determinism_and_generator_list(pipe):
    a = pipe(PROMPT, num_inference_steps=3, generator=seeded(1), output_type="np").images
    b = pipe(PROMPT, num_inference_steps=3, generator=seeded(1), output_type="np").images
    c = pipe(PROMPT, num_inference_steps=3, generator=seeded(2), output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    pair = pipe(
        PROMPT, num_images_per_prompt=2, num_inference_steps=3, generator=[seeded(1), seeded(2)], output_type="np"
    ).images
    np.testing.assert_allclose(pair[0], a[0], atol=1e-5)
    np.testing.assert_allclose(pair[1], c[0], atol=1e-5)


def test_guidance_changes_result_and_negative_prompt_matters(pipe):
    def run(**kw):
        return pipe(PROMPT, num_inference_steps=3, generator=seeded(0), output_type="latent", **kw).images

    off, on = run(guidance_scale=1.0), run(guidance_scale=6.0)
    assert (off - on).abs().max() > 1e-3
    assert (run(guidance_scale=6.0, negative_prompt="a blue square") - on).abs().max() > 1e-4
    rescaled = run(guidance_scale=6.0, guidance_rescale=0.7)
    assert (rescaled - on).abs().max() > 1e-5


def test_prompt_embeds_equal_prompt(pipe):
    embeds, negative = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    from_text = pipe(PROMPT, num_inference_steps=2, generator=seeded(0), output_type="latent").images
    from_embeds = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=2,
        generator=seeded(0),
        output_type="latent",
    ).images
    torch.testing.assert_close(from_text, from_embeds)


def test_given_latents_are_used(pipe):
    latents = torch.randn(1, 4, 16, 16, generator=seeded(5))
    a = pipe(PROMPT, latents=latents, num_inference_steps=2, output_type="latent").images
    b = pipe(PROMPT, num_inference_steps=2, generator=seeded(5), output_type="latent").images
    torch.testing.assert_close(a, b)


def test_custom_timesteps_and_sigmas(pipe):
    from diffusers import EulerDiscreteScheduler

    seen = []
    pipe(
        PROMPT,
        timesteps=[999, 500, 1],
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: seen.append(int(t)) or {},
    )
    assert seen == [999, 500, 1]
    with pytest.raises(ValueError, match="sigmas"):
        pipe(PROMPT, sigmas=[14.0, 1.0, 0.1], output_type="latent")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    out = pipe(PROMPT, sigmas=[14.0, 1.0, 0.1], output_type="latent").images
    assert out.shape == (1, 4, 16, 16)


def test_callback_changes_latents_and_stops_loop(pipe):
    steps = []

    def zero_then_stop(p, i, t, tensors):
        steps.append(i)
        assert set(tensors) == {"latents", "prompt_embeds"}
        if i == 1:
            p._interrupt = True
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = pipe(
        PROMPT,
        num_inference_steps=10,
        output_type="latent",
        callback_on_step_end=zero_then_stop,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    ).images
    assert steps == [0, 1]
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 31}, "height"),
        ({"width": 17}, "width"),
        ({"prompt": None}, "exactly one of `prompt` and `prompt_embeds`"),
        ({"prompt_embeds": torch.zeros(1, 16, 32)}, "exactly one of `prompt` and `prompt_embeds`"),
        ({"generator": [torch.Generator()] * 3}, "3 generators"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"prompt": []}, "non-empty list"),
        ({"prompt": ["a", "b"], "negative_prompt": ["c"]}, "negative_prompt"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": -3}, "num_inference_steps"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, "latents"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": "7"}, "guidance_scale"),
        ({"prompt": ["a", 3]}, "non-empty list of str"),
        (
            {"height": 65536, "width": 65536},
            r"an image of 65536x65536 needs at least [\d,.]+ GiB of memory to sample and .* free on cpu: at most about",
        ),
        ({"num_images_per_prompt": 10**7}, r"10000000 images at 32x32 need at least .* image(s)? at a time fit"),
    ],
)
def test_bad_input_raises_value_error_naming_it(pipe, kwargs, message):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_long_prompt_is_cut_with_warning(pipe, caplog):
    long_prompt = " ".join(["red"] * 40)
    with caplog.at_level("WARNING"):
        out = pipe(long_prompt, num_inference_steps=2, output_type="latent").images
    assert out.shape == (1, 4, 16, 16)
    assert "prompt cut to 16 tokens" in caplog.text and "red" in caplog.text


def test_the_memory_estimate_says_what_fits(pipe, monkeypatch):
    from ldm_pipeline import memory

    need = memory.LOW_FACTOR * memory.largest_activation(pipe.unet.config, pipe.vae.config, 64, 64, 1, True) * 4
    monkeypatch.setattr(memory, "free_bytes", lambda device: 3 * need)
    pipe(PROMPT, num_inference_steps=1, height=64, width=64, num_images_per_prompt=3, output_type="latent")
    with pytest.raises(ValueError, match="4 images at 64x64 need .*: 3 images at a time fit at this size"):
        pipe(PROMPT, num_inference_steps=1, height=64, width=64, num_images_per_prompt=4)
    with pytest.raises(ValueError, match=r"an image of 128x128 needs .*: at most about \d+x\d+ fits"):
        pipe(PROMPT, num_inference_steps=1, height=128, width=128, num_images_per_prompt=1)
    pipe.vae.enable_slicing()  # the VAE then decodes one image at a time: larger batches fit
    assert memory.largest_activation(pipe.unet.config, pipe.vae.config, 64, 64, 8, False, vae_batch=1) < (
        memory.largest_activation(pipe.unet.config, pipe.vae.config, 64, 64, 8, False)
    )
