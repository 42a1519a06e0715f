"""CPUAttnProcessor: fp32 attention for short low-precision sequences, diffusers' processor otherwise."""

import ldm_pipeline.training.attention as attention
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from ldm_pipeline.training.attention import CPUAttnProcessor, use_cpu_attention
from ldm_pipeline.training.quickstart import quickstart_config
from ldm_pipeline.training.unet import trained_modules

from ldm_pipeline.presets import build_unet, get_preset


def _attn() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 10, 16, generator=g), torch.randn(3, 7, 12, generator=g)


def test_bf16_autocast_attention_product_runs_in_fp32():
    attn, (x, context) = _attn(), _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = CPUAttnProcessor()(attn, x, context)
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    # By hand: heads split, softmax(q k^T / sqrt(d)) v in fp32 from the bf16 projections.
    q, k, v = (t.float().view(3, -1, 2, 8).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    product = (weights @ v).transpose(1, 2).reshape(3, -1, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attn.to_out[0](product)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # diffusers' processor computes the product in bf16: the results differ.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = AttnProcessor2_0()(attn, x, context)
    assert not torch.equal(out, stock)
    torch.testing.assert_close(out.float(), stock.float(), rtol=0.05, atol=0.05)


def test_bf16_weights_without_autocast_run_the_product_in_fp32():
    (x, context), low = _inputs(), _attn().to(torch.bfloat16)
    x, context = x.to(torch.bfloat16), context.to(torch.bfloat16)
    out = CPUAttnProcessor()(low, x, context)
    stock = AttnProcessor2_0()(low, x, context)
    reference = AttnProcessor2_0()(_attn().to(torch.bfloat16).float(), x.float(), context.float())
    assert out.dtype == torch.bfloat16
    # Closer to the fp32 answer than the all-bf16 one is.
    assert (out.float() - reference).abs().mean() < (stock.float() - reference).abs().mean()


def _same_as_stock(run, **kwargs) -> None:
    attn, (x, context) = _attn(), _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run == "bf16"):
        ours = CPUAttnProcessor()(attn, x, context, **kwargs)
        stock = AttnProcessor2_0()(attn, x, context, **kwargs)
    assert torch.equal(ours, stock)


def test_fp32_is_diffusers_processor_exactly():
    _same_as_stock("fp32")


def test_masked_attention_goes_to_diffusers_processor():
    mask = torch.ones(3, 1, 7)
    mask[:, :, -2:] = 0
    _same_as_stock("bf16", attention_mask=mask)


def test_long_sequences_keep_the_bf16_kernel(monkeypatch):
    monkeypatch.setattr(attention, "FP32_UP_TO", 10 * 7 - 1)
    _same_as_stock("bf16")


def test_use_cpu_attention_replaces_only_the_default_processor():
    unet = build_unet(get_preset("tiny"))
    processors = unet.attn_processors
    keep = sorted(processors)[0]
    unet.set_attn_processor({n: AttnProcessor() if n == keep else p for n, p in processors.items()})
    assert use_cpu_attention(unet) == len(processors) - 1
    after = unet.attn_processors
    assert type(after[keep]) is AttnProcessor
    assert all(type(p) is CPUAttnProcessor for n, p in after.items() if n != keep)
    assert use_cpu_attention(torch.nn.Linear(2, 2)) == 0


@pytest.mark.parametrize("setting, processor", [("auto", CPUAttnProcessor), ("sdpa", AttnProcessor2_0)])
def test_trainer_attention_setting(setting, processor):
    cfg = quickstart_config(smoke=True, overrides=[f"unet.attention={setting}"])
    unet = trained_modules(cfg, text_encoder=None).unet
    assert {type(p) for p in unet.attn_processors.values()} == {processor}
