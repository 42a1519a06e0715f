"""Eager levers on the UNet forward alone: what each would give a sampling call before it is built.

One process holds the saved UNet several ways and times one forward of each at the guidance batch
(``2 × --batch``), in rounds that alternate the variants, median over rounds:

- ``eager``: the UNet as diffusers runs it (``torch.no_grad``), the baseline;
- ``inference_mode``: the same under ``torch.inference_mode`` (no autograd bookkeeping at all);
- ``channels_last``: weights and input in channels-last layout;
- ``prepacked_conv``: every ``Conv2d`` calls oneDNN with its weight reordered once, up front
  (``torch.ops.mkldnn._reorder_convolution_weight`` / ``_convolution_pointwise``, the ops
  inductor's ``freezing`` uses), instead of reordering it on every call;
- ``prepacked_conv_linear``: the same, and every ``Linear`` through ``_linear_pointwise``;
- ``traced``: the forward recorded once by ``torch.jit.trace`` and replayed (the same aten ops
  without the Python around them), as the pipeline does from a shape's second call
  (``ldm_pipeline/tracing.py``).

Each variant's largest difference from ``eager``'s output is reported too, so a lever that changes
the result shows it. Usage::

    python benchmarks/unet_forward_levers.py --model runs/quickstart/pipeline --out levers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ldm_pipeline.tracing import trace_unet


def _prepack(unet: UNet2DConditionModel, linear: bool) -> UNet2DConditionModel:
    """A copy whose convolutions (and linears) call oneDNN with weights packed once."""
    unet = copy.deepcopy(unet)
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d) and module.padding_mode == "zeros":
            geometry = (list(module.padding), list(module.stride), list(module.dilation), module.groups)
            packed = torch.ops.mkldnn._reorder_convolution_weight(module.weight.detach(), *geometry)

            def conv(x, m=module, w=packed, g=geometry):
                return torch.ops.mkldnn._convolution_pointwise(x, w, m.bias, *g, "none", [], "")

            module.forward = conv
        elif linear and isinstance(module, torch.nn.Linear):
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())

            def dense(x, m=module, w=packed):
                return torch.ops.mkldnn._linear_pointwise(x, w, m.bias, "none", [], "")

            module.forward = dense
    return unet


class _Output:
    """What a UNet returns, for the traced variant (which returns the tensor itself)."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a pipeline folder (its unet/ is used)")
    parser.add_argument("--batch", type=int, default=1, help="images per call; the UNet sees twice this")
    parser.add_argument("--calls", type=int, default=30, help="forwards per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = UNet2DConditionModel.from_pretrained(args.model / "unet").eval()
    side, channels = base.config.sample_size, base.config.in_channels
    n = 2 * args.batch
    x = torch.randn(n, channels, side, side)
    tokens = json.loads((args.model / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]
    cond = torch.randn(n, tokens, base.config.cross_attention_dim)
    t = torch.tensor(500)

    variants: dict[str, tuple[UNet2DConditionModel, torch.Tensor, type[AbstractContextManager]]] = {
        "eager": (base, x, torch.no_grad),
        "inference_mode": (base, x, torch.inference_mode),
        "channels_last": (
            copy.deepcopy(base).to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
            torch.no_grad,
        ),
        "prepacked_conv": (_prepack(base, linear=False), x, torch.no_grad),
        "prepacked_conv_linear": (_prepack(base, linear=True), x, torch.no_grad),
    }
    with torch.no_grad():
        traced = trace_unet(base, x, t, cond)
    variants["traced"] = (lambda sample, *args, **kwargs: _Output(traced(sample, *args, **kwargs)), x, torch.no_grad)
    with torch.no_grad():
        reference = base(x, t, encoder_hidden_states=cond).sample
    max_diff, times = {}, {name: [] for name in variants}
    for name, (unet, sample, mode) in variants.items():
        with mode():
            for _ in range(5):
                out = unet(sample, t, encoder_hidden_states=cond).sample
        max_diff[name] = float((out - reference).abs().max())
    for _ in range(args.rounds):
        for name, (unet, sample, mode) in variants.items():
            with mode():
                start = time.perf_counter()
                for _ in range(args.calls):
                    unet(sample, t, encoder_hidden_states=cond)
                times[name].append((time.perf_counter() - start) / args.calls * 1000)
    eager = statistics.median(times["eager"])
    report = {
        "model": str(args.model),
        "unet_batch": n,
        "torch": torch.__version__,
        "ms_per_forward": {k: statistics.median(v) for k, v in times.items()},
        "speedup_over_eager": {k: eager / statistics.median(v) for k, v in times.items()},
        "max_abs_diff_from_eager": max_diff,
        "rounds_ms": times,
    }
    for name in variants:
        print(
            f"{name:>22}: {report['ms_per_forward'][name]:6.2f} ms  "
            f"{report['speedup_over_eager'][name]:.2f}x  max diff {max_diff[name]:.1e}"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
