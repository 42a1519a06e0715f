"""The traced UNet forward (ldm_pipeline/tracing.py): same images, used only when it is safe."""

import logging

import numpy as np
import pytest
import torch
from conftest import seeded
from diffusers import LCMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from ldm_pipeline.training.distill import lcm_student
from peft import LoraConfig

from ldm_pipeline.tracing import plain_signature

PROMPT = "a red circle on a white background"


def _images(pipe, **kwargs):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.5, "generator": seeded(0), "output_type": "np", **kwargs}
    return pipe(PROMPT, **kwargs).images


class _NamedProcessor(AttnProcessor2_0):
    """The default processor under another class, as a user's custom processor would be."""


def test_second_call_is_traced_and_gives_the_same_images(pipe, tiny_dir):
    first = _images(pipe)
    assert len(pipe._unet_traces) == 0  # a shape met for the first time runs eagerly
    second = _images(pipe)
    assert len(pipe._unet_traces) == 1
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(_images(pipe, negative_prompt="blue"), _images(pipe, negative_prompt="blue"))
    stock = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    assert np.abs(_images(pipe) - _images(stock)).max() <= 1e-4


def test_an_lcm_student_is_traced_with_its_guidance_embedding_as_an_input(pipe):
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.unet = lcm_student(pipe.unet, 32).eval()  # as from_pretrained loads it
    torch.nn.init.normal_(pipe.unet.time_embedding.cond_proj.weight)  # so that w changes the output
    first = _images(pipe, guidance_scale=3.0)
    second = _images(pipe, guidance_scale=3.0)
    assert len(pipe._unet_traces) == 1
    np.testing.assert_array_equal(second, first)
    # w is an input of the trace, not a constant: another guidance replays it and matches eager.
    other = _images(pipe, guidance_scale=6.0)
    assert len(pipe._unet_traces) == 1 and np.abs(other - first).max() > 1e-3
    pipe.disable_unet_tracing()
    np.testing.assert_array_equal(_images(pipe, guidance_scale=6.0), other)


def test_new_shapes_get_their_own_trace_and_disable_drops_them(pipe):
    _images(pipe), _images(pipe)
    small = _images(pipe, height=16, width=16)
    assert len(pipe._unet_traces) == 1
    np.testing.assert_array_equal(_images(pipe, height=16, width=16), small)
    assert len(pipe._unet_traces) == 2
    pipe.disable_unet_tracing()
    np.testing.assert_array_equal(_images(pipe, height=16, width=16), small)
    _images(pipe, height=16, width=16)
    assert len(pipe._unet_traces) == 0
    pipe.enable_unet_tracing()
    _images(pipe), _images(pipe)
    assert len(pipe._unet_traces) == 1


def test_calls_under_inference_mode(pipe):
    with torch.inference_mode():
        first, second = _images(pipe), _images(pipe)
    assert len(pipe._unet_traces) == 1
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(_images(pipe), first)  # the trace made there also runs outside it


def test_autocast_runs_eagerly(pipe, caplog):
    _images(pipe), _images(pipe)
    with torch.autocast("cpu", dtype=torch.bfloat16), caplog.at_level(logging.WARNING):
        first, second = _images(pipe), _images(pipe)
    assert len(pipe._unet_traces) == 1 and not caplog.text
    np.testing.assert_array_equal(second, first)
    assert np.abs(second - _images(pipe)).max() > 1e-4  # autocast did apply: not the fp32 trace's images


def test_trace_follows_in_place_weight_changes(pipe):
    _images(pipe), _images(pipe)
    assert len(pipe._unet_traces) == 1
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.data.mul_(1.1)  # as EMA weights or a fused LoRA are written: in place, through .data
    traced = _images(pipe)
    assert len(pipe._unet_traces) == 1  # the same trace, reading the new weights
    pipe.disable_unet_tracing()
    np.testing.assert_array_equal(traced, _images(pipe))


def test_replaced_parameter_or_dtype_makes_a_new_key(pipe):
    before = plain_signature(pipe.unet)
    pipe.unet.conv_in.weight = torch.nn.Parameter(pipe.unet.conv_in.weight.detach().clone())
    after = plain_signature(pipe.unet)
    assert after is not None and after != before
    pipe.unet.to(torch.bfloat16)
    assert plain_signature(pipe.unet) not in (before, after)


def test_traces_of_a_replaced_unet_are_dropped(pipe):
    _images(pipe), _images(pipe)
    assert len(pipe._unet_traces) == 1
    pipe.unet = type(pipe.unet).from_config(pipe.unet.config).eval()
    _images(pipe)
    assert len(pipe._unet_traces) == 0  # the old UNet's weights are no longer held


@pytest.mark.parametrize(
    "change",
    [
        lambda unet: unet.train(),
        lambda unet: unet.conv_in.register_forward_hook(lambda *args: None),
        lambda unet: unet.set_attn_processor(_NamedProcessor()),
        lambda unet: unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
        lambda unet: unet.compile(),
        lambda unet: (unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"])), unet.eval()),
    ],
    ids=["training", "hook", "custom-processor", "freeu", "compiled", "adapter"],
)
def test_unet_state_that_python_decides_stays_eager(pipe, change):
    assert plain_signature(pipe.unet) is not None
    change(pipe.unet)
    assert plain_signature(pipe.unet) is None


def test_lora_scale_changes_reach_the_images(pipe):
    _images(pipe), _images(pipe)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    pipe.unet.eval()  # new layers start in training mode, which alone would keep the UNet eager
    with_lora = _images(pipe)
    np.testing.assert_array_equal(_images(pipe), with_lora)
    pipe.unet.disable_adapters()  # a flag PEFT reads in Python: a trace would have kept the adapter on
    without = _images(pipe)
    assert np.abs(with_lora - without).max() > 1e-4
    pipe.disable_unet_tracing()
    np.testing.assert_array_equal(_images(pipe), without)


def test_a_trace_that_fails_leaves_the_eager_forward(pipe, monkeypatch, caplog):
    eager = _images(pipe)

    def broken(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(_images(pipe), eager)
    assert "UNet tracing failed" in caplog.text and "cannot trace this" in caplog.text
    assert len(pipe._unet_traces) == 0
    caplog.clear()
    np.testing.assert_array_equal(_images(pipe), eager)
    assert "UNet tracing failed" not in caplog.text  # the key is remembered, not retried every call


def test_an_inexact_trace_is_not_used(pipe, monkeypatch, caplog):
    eager = _images(pipe)
    wrong = lambda unet, sample, *rest: lambda *a: torch.zeros_like(sample)  # noqa: E731
    monkeypatch.setattr("ldm_pipeline.tracing.trace_unet", wrong)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(_images(pipe), eager)
    assert "did not reproduce the eager forward" in caplog.text and len(pipe._unet_traces) == 0
