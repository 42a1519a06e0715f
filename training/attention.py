"""Attention for CPUs, where PyTorch's bf16 flash-attention kernel is slow on short sequences.

On this project's 2-core AMD EPYC (AVX-512 BF16), `F.scaled_dot_product_attention` on bf16
inputs ran its flash kernel (forward + backward) 1.5-4.2x slower than the same call on inputs cast
to fp32 over 4-64 positions with 16-dim heads (a quick-start UNet's at batch 64) and 1.9x slower
at 256 x 256; 1.0-1.2x at 256 x 256 with 40-dim heads and at 1,024 x 77 queries x keys; level at
512 x 512; and faster from 1,024 x 1,024 up (`benchmarks/attention_kernels.py`). The quick-start
UNet's training step under bf16 autocast spent 30% of its time there (torch.profiler).
`CPUAttnProcessor` runs those calls in fp32 and leaves the rest as diffusers' `AttnProcessor2_0`
runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

# Query length x key length up to which the fp32 kernel measured faster or level (256 x 256 and
# 1,024 x 77 are in; 512 x 512, 0.89-1.03x over three runs, is not).
FP32_UP_TO = 128 * 1024


class CPUAttnProcessor(AttnProcessor2_0):
    """diffusers' `AttnProcessor2_0`, except that on the CPU a bf16/fp16 attention over at most
    `FP32_UP_TO` query x key positions is computed in fp32 (then cast back).

    Only the attention product changes precision; the projections run as before (under autocast
    in bf16). Calls on 4-D feature maps, or with a mask, spatial or group norm, cross norm or q/k
    norms go to `AttnProcessor2_0` unchanged.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if not self._applies(attn, hidden_states, context, attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        with torch.autocast("cpu", enabled=False):
            # AttnProcessor2_0 uses SDPA's default scale, not attn.scale; so does this.
            out = F.scaled_dot_product_attention(query.float(), key.float(), value.float())
        out = out.to(query.dtype).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    @staticmethod
    def _applies(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor, mask) -> bool:
        if hidden_states.device.type != "cpu" or hidden_states.ndim != 3 or mask is not None:
            return False
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
            return False
        if attn.norm_q is not None or attn.norm_k is not None:
            return False
        low = (torch.bfloat16, torch.float16)
        runs_low = hidden_states.dtype in low or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low
        )
        return runs_low and hidden_states.shape[1] * context.shape[1] <= FP32_UP_TO


def use_cpu_attention(model: torch.nn.Module) -> int:
    """Give every `AttnProcessor2_0` (diffusers' default) in ``model`` a `CPUAttnProcessor`;
    other processors (adapters', custom ones) stay. Returns how many were replaced."""
    if not hasattr(model, "attn_processors"):
        return 0
    processors = model.attn_processors
    plain = {name for name, p in processors.items() if type(p) is AttnProcessor2_0}
    if plain:
        model.set_attn_processor({n: CPUAttnProcessor() if n in plain else p for n, p in processors.items()})
    return len(plain)
