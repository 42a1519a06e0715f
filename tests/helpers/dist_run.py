"""A tiny UNet-stage run that each process ends by writing its own weights, for the multi-process test.

    python dist_run.py PRETRAINED OUT                                    # one process
    python -m torch.distributed.run --nproc_per_node 2 dist_run.py PRETRAINED OUT   # two (gloo)

Each process writes ``OUT/rank{K}.safetensors``: its UNet's raw weights after the last step.
"""

import sys
from pathlib import Path

import ldm_pipeline.training.unet as unet_stage
from ldm_pipeline.training.config import config_from_dict
from ldm_pipeline.training.run import train
from safetensors.torch import save_file


def main() -> None:
    pretrained, out = sys.argv[1], Path(sys.argv[2])
    real_run_loop = unet_stage.run_loop

    def run_loop(accelerator, model, *args, **kwargs):
        result = real_run_loop(accelerator, model, *args, **kwargs)
        state = {k: v.detach().contiguous() for k, v in accelerator.unwrap_model(model).unet.state_dict().items()}
        save_file(state, out / f"rank{accelerator.process_index}.safetensors")
        return result

    unet_stage.run_loop = run_loop
    cfg = config_from_dict(
        {
            "model": "tiny",
            "pretrained": pretrained,
            "stages": ["unet"],
            "mixed_precision": "no",
            "report_to": "none",
            "data": {"num_samples": 64, "holdout": 0, "random_flip": True},
            "unet": {"steps": 4, "batch_size": 8, "gradient_accumulation_steps": 2, "warmup_steps": 1},
        }
    )
    train(cfg, out)


if __name__ == "__main__":
    main()
