"""A traced UNet forward for repeated CPU sampling: the same kernels without Python's per-module cost.

At the small latent sizes a CPU samples, much of a UNet forward is Python (module calls,
diffusers' argument and shape handling) rather than kernels: on the shapes quick-start UNet
(6.7M parameters, 8×8 latents, 2 CPU cores) one traced forward took about 15 ms against about
25 ms eager, with bit-identical output (`benchmarks/unet_forward_levers.py`).

``torch.jit.trace`` records the aten ops of one eager forward; replaying them runs the same kernels
on the same parameter tensors (a trace shares them, so in-place updates such as EMA weights or a
fused LoRA are seen). But it freezes everything Python decided: input shapes and dtypes, branches,
attention processors, adapter scales, hooks. So a trace is only used for a UNet in a plain state
(`plain_signature`), is keyed by that state and the input shapes and dtypes, is made only the
second time a pipeline meets a key (a one-off call never pays for tracing), and must reproduce the
eager forward exactly once when made, or the key stays eager.

What guards it against a library update. `plain_signature` reads private attributes of torch
(``_compiled_call_impl``, ``_forward_hooks``, ``_forward_pre_hooks``), diffusers
(``_hf_peft_config_loaded``, FreeU's ``b1`` on the up blocks) and peft (its layers' module names).
Each state they detect is also caught by a second check (a compiled or adapted UNet also has a
non-plain module or processor), and tests/test_tracing.py puts the UNet in each state (training,
hook, custom processor, FreeU, compiled, adapter, LoRA scale) and fails if the signature does not
turn eager, or if the images differ from eager ones. ``torch.jit.trace`` is in maintenance in
PyTorch: any exception while tracing, or a trace that does not reproduce the eager output
exactly, leaves that key eager with a warning (tested by making both happen), so a torch that
drops or changes it costs speed, never images. ``pipe.disable_unet_tracing()`` turns it off.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# Processors whose forward depends on nothing but the module's weights and the inputs.
PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0)


def plain_signature(unet: torch.nn.Module) -> Hashable | None:
    """What a trace of ``unet`` depends on, or ``None`` when the UNet must run eagerly.

    Eager is required for a UNet that is training, not on the CPU, compiled, carrying adapters
    (PEFT layers read their scales in Python), hooks (offloading, user hooks), non-default
    attention processors or FreeU. Otherwise the signature names every module, attention
    processor and parameter (identity, dtype, shape), so replacing any of them makes a new key.
    """
    if not isinstance(unet, UNet2DConditionModel) or unet.device.type != "cpu":
        return None
    if getattr(unet, "_compiled_call_impl", None) is not None or getattr(unet, "_hf_peft_config_loaded", False):
        return None
    modules = list(unet.modules())
    for module in modules:
        if (
            module.training
            or module._forward_hooks
            or module._forward_pre_hooks
            or "forward" in module.__dict__
            or type(module).__module__.startswith("peft.")
        ):
            return None
    processors = list(unet.attn_processors.values())
    if not all(type(p) in PLAIN_PROCESSORS for p in processors):
        return None
    if any(getattr(block, "b1", None) is not None for block in unet.up_blocks):  # FreeU
        return None
    return (
        tuple(id(m) for m in modules),
        tuple(id(p) for p in processors),
        tuple((id(p), p.dtype, tuple(p.shape)) for p in unet.parameters()),
    )


class _UNetCall(torch.nn.Module):
    """The pipeline's UNet call as a module of tensors in, tensor out, which ``torch.jit.trace``
    needs: ``(sample, timestep, encoder_hidden_states[, timestep_cond])``, the last one the
    guidance embedding of an LCM-distilled UNet."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
    ):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            timestep_cond=timestep_cond,
            return_dict=False,
        )[0]


def trace_unet(unet: UNet2DConditionModel, *inputs: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``unet(sample, timestep, encoder_hidden_states=...[, timestep_cond=...])``
    for these shapes and dtypes."""
    with warnings.catch_warnings():
        # Its warnings are about shape-dependent Python branches, which a trace's key fixes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(_UNetCall(unet), inputs, check_trace=False)


def _inputs_key(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


class UNetTraces:
    """A pipeline's traced UNet forwards, least recently used dropped beyond ``max_traces``."""

    def __init__(self, max_traces: int = 8):
        self.max_traces = max_traces
        self._traces: OrderedDict[Hashable, torch.jit.ScriptModule] = OrderedDict()
        self._seen: set[Hashable] = set()
        self._failed: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._traces)

    def clear(self) -> None:
        self._traces.clear()
        self._seen.clear()
        self._failed.clear()

    def runner(self, unet: UNet2DConditionModel, enabled: bool = True) -> Callable[..., torch.Tensor]:
        """The UNet forward for one pipeline call: ``run(sample, timestep, encoder_hidden_states,
        timestep_cond=None)``.

        Keys first met in this call run eagerly; keys met in an earlier call are traced (once)
        and replayed. With ``enabled`` false, or a UNet not in a plain state, every call is eager.
        """
        signature = plain_signature(unet) if enabled else None
        # A trace holds its UNet's weights: keep only those of the UNet as it is now.
        for key in [k for k in self._traces if k[0] != signature]:
            del self._traces[key]
        self._seen = {k for k in self._seen if k[0] == signature}
        new_this_call: set[Hashable] = set()
        eager = _UNetCall(unet)

        def run(
            sample: torch.Tensor,
            timestep: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            timestep_cond: torch.Tensor | None = None,
        ) -> torch.Tensor:
            inputs = (sample, timestep, encoder_hidden_states)
            if timestep_cond is not None:
                inputs += (timestep_cond,)
            # Under autocast a trace would hold the cast weights as constants, blind to weight updates.
            if (
                signature is None
                or torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")
                or not isinstance(timestep, torch.Tensor)
            ):
                return eager(*inputs)
            key = (signature, _inputs_key(*inputs))
            traced = self._traces.get(key)
            if traced is None:
                if key in self._failed or key in new_this_call or key not in self._seen:
                    self._seen.add(key)
                    new_this_call.add(key)
                    return eager(*inputs)
                traced = self._trace(eager, key, inputs)
                if traced is None:
                    return eager(*inputs)
            self._traces.move_to_end(key)
            return traced(*inputs)

        return run

    def _trace(
        self, eager: _UNetCall, key: Hashable, inputs: tuple[torch.Tensor, ...]
    ) -> torch.jit.ScriptModule | None:
        """Trace the forward for these inputs; ``None`` (and the key stays eager) unless it is exact."""
        try:
            traced = trace_unet(eager.unet, *inputs)
            exact = torch.equal(traced(*inputs), eager(*inputs))
        except Exception as err:  # noqa: BLE001 (any failure to trace leaves the eager forward, which works)
            logger.warning(f"UNet tracing failed, sampling eagerly: {type(err).__name__}: {err}")
            exact, traced = False, None
        if not exact:
            if traced is not None:
                logger.warning("the traced UNet did not reproduce the eager forward exactly; sampling eagerly")
            self._failed.add(key)
            return None
        self._traces[key] = traced
        while len(self._traces) > self.max_traces:
            self._traces.popitem(last=False)
        return traced
