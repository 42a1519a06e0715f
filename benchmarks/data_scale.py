"""Fine-tuning at scale: memory, caching speed, process split and kill/resume of the sharded cache.

Synthetic JPEGs stand in for a large data set: 512-1,024 px on the short side, six aspect ratios
(1:1, 4:3, 3:4, 16:9, 9:16, 2:1), a few shapes on a gradient, a caption each, listed in a CSV
(``first-N.csv`` lists the first N). Each command below runs ``ldm`` in its own process under
``/usr/bin/time -v`` (peak RSS is that process's and its workers' largest), at 512 px with
bucketing and random flips, as a user would:

- ``check``: ``ldm data check`` of the first N images;
- ``train``: a LoRA fine-tune of a pipeline folder for one UNet step (its wall time is the time to
  the first step; the report gives the caching seconds, hence images per second), with
  ``--processes 2`` under torchrun and ``--workers`` DataLoader workers;
- ``resume``: the same, killed with SIGKILL after ``--kill-after`` seconds of caching, run again,
  and its cache compared tensor by tensor with an uninterrupted one's.

``--model small`` is a pipeline with a cheap VAE (four 4-channel down blocks, factor 8, no
attention) and the tiny UNet, so that 10,000 images cache in minutes on a CPU; ``--model sd15``
is Stable Diffusion 1.5's architecture with random weights (a 4 GB folder, made once).

Usage::

    python benchmarks/data_scale.py train --n 1000 --model small --work /tmp/scale
    python benchmarks/data_scale.py check --n 10000 --work /tmp/scale
    python benchmarks/data_scale.py resume --n 1000 --kill-after 40 --work /tmp/scale
    python benchmarks/data_scale.py train --n 1000 --previous /tmp/old --work /tmp/scale  # an earlier REV
    python benchmarks/data_scale.py train --n 200 --square --model sd15 --work /tmp/scale \\
        --set unet.batch_size=1 --set data.random_flip=false
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1)]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def _one_image(args: tuple[Path, int]) -> None:
    folder, i = args
    rng = np.random.default_rng(i)
    aw, ah = ASPECTS[i % len(ASPECTS)]
    short = int(rng.integers(512, 1025))
    w, h = (short * aw // ah, short) if aw >= ah else (short, short * ah // aw)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, h)[:, None, None]
    canvas = Image.fromarray(((1 - ramp) * top + ramp * bottom).astype(np.uint8).repeat(w, axis=1))
    draw = ImageDraw.Draw(canvas)
    colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 3]
    cx, cy, r = w // 2, h // 2, short // 4
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    canvas.save(folder / "images" / f"{i:06d}.jpg", quality=85)


def make_images(work: Path, n: int, square: bool = False) -> Path:
    """``work/images`` holding enough JPEGs and ``work/first-<n>.csv`` listing the first n (with
    ``square``, ``first-<n>-square.csv``: the first n square ones)."""
    (work / "images").mkdir(parents=True, exist_ok=True)
    have = len(list((work / "images").glob("*.jpg")))
    needed = n * len(ASPECTS) if square else n
    if have < needed:
        with Pool(os.cpu_count()) as pool:
            pool.map(_one_image, [(work, i) for i in range(have, needed)], chunksize=64)
    table = work / (f"first-{n}-square.csv" if square else f"first-{n}.csv")
    if not table.exists():
        lines = ["file_name,text"]
        for i in range(0, needed, len(ASPECTS) if square else 1):
            colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 3]
            lines.append(f"images/{i:06d}.jpg,a {colour} {shape} on a gradient background number {i}")
        table.write_text("\n".join(lines) + "\n")
    return table


def make_pipeline(work: Path, model: str) -> Path:
    """A pipeline folder to fine-tune from, made once: ``small`` or ``sd15`` (random weights)."""
    folder = work / f"pipeline-{model}"
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL

    from ldm_pipeline import build_pipeline

    torch.manual_seed(0)
    if model == "sd15":
        pipe = build_pipeline("sd15")
    else:
        pipe = build_pipeline("tiny")
        pipe.vae = AutoencoderKL(
            block_out_channels=(4, 4, 4, 4),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=2,
            latent_channels=4,
            mid_block_add_attention=False,
        )
        unet_config = {**pipe.unet.config, "sample_size": 64}
        pipe.unet = type(pipe.unet).from_config(unet_config)
        pipe.register_modules(vae=pipe.vae, unet=pipe.unet)
    pipe.save_pretrained(folder)
    return folder


def _timed(command: list[str], env: dict | None = None, kill_after: float | None = None) -> dict:
    """Run ``command`` under /usr/bin/time -v: wall seconds, peak RSS (GB), exit code."""
    start = time.monotonic()
    proc = subprocess.Popen(
        ["/usr/bin/time", "-v", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return {
        "command": " ".join(command),
        "returncode": proc.returncode,
        "wall_s": round(time.monotonic() - start, 1),
        "peak_rss_gb": round(int(peak.group(1)) / 2**20, 3) if peak else None,
        "tail": (out + err.split("\tCommand being timed")[0]).strip().splitlines()[-6:],
    }


def _du(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 3) if path.exists() else 0.0


def _train_command(args, table: Path, pipeline: Path, out: Path) -> tuple[list[str], dict]:
    overrides = [
        f"pretrained={pipeline}",
        f"data.source={table}",
        "data.resolution=512",
        "mixed_precision=no",
        "report_to=none",
        "unet.steps=1",
        "unet.batch_size=2",
        "unet.warmup_steps=0",
        "unet.validation_every_steps=null",
        f"data.cache_dir={out / 'cache'}",
    ]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    overrides += args.set
    if args.previous:
        # The code of an earlier commit (a `git worktree` with ldm_pipeline/training and
        # ldm_pipeline/configs linked to its training/ and configs/), run in its own process.
        # `python -c` puts the working directory first on sys.path: the earlier code goes before it.
        first = f"import sys; sys.path.insert(0, {args.previous!r}); "
        entry = first + "from ldm_pipeline.cli import main; sys.exit(main())"
        return [sys.executable, "-c", entry, "train", "finetune-lora", "--output", str(out), *overrides], {
            "PYTHONPATH": args.previous
        }
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    if args.processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes)]
        command = [*launcher, "-m", "ldm_pipeline.cli", "train", "finetune-lora", "--output", str(out), *overrides]
        # torchrun gives each process one thread unless told otherwise: the processes share the cores.
        return command, threads
    return ["ldm", "train", "finetune-lora", "--output", str(out), *overrides], threads


def _cache_tensors(cache: Path) -> dict:
    """Every latent shard's tensors, for comparing two caches."""
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(cache.glob("latent-shards-*/*.safetensors"))}


def run(args) -> dict:
    work = Path(args.work)
    table = make_images(work, args.n, args.square)
    result = {"n": args.n, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    result["cpu"] = _cpu_name()
    if args.command == "check":
        result["check"] = _timed(["ldm", "data", "check", str(table), "--resolution", "512"])
        return result
    pipeline = make_pipeline(work, args.model)
    variant = f"{'-square' if args.square else ''}{'-previous' if args.previous else ''}"
    out = work / f"run-{args.model}-{args.n}{variant}-p{args.processes}-w{args.workers}-t{args.threads}"
    shutil.rmtree(out, ignore_errors=True)
    command, env = _train_command(args, table, pipeline, out)
    result.update({"model": args.model, "processes": args.processes, "workers": args.workers, "set": args.set})
    result["threads"] = args.threads
    result["code"] = "previous" if args.previous else "this"
    if args.command == "train":
        result["train"] = _timed(command, env)
    else:
        result["killed"] = _timed(command, env, kill_after=args.kill_after)
        shards = list(out.glob("cache/latent-shards-*/*.safetensors"))
        result["shards_after_kill"] = len(shards)
        result["train"] = _timed(command, env)
        straight = work / f"straight-{args.model}-{args.n}"
        shutil.rmtree(straight, ignore_errors=True)
        result["uninterrupted"] = _timed(_train_command(args, table, pipeline, straight)[0], env)
        a, b = _cache_tensors(out / "cache"), _cache_tensors(straight / "cache")
        same = a.keys() == b.keys() and all(all((a[k][t] == b[k][t]).all() for t in a[k]) for k in a)
        result["resumed_cache_equals_uninterrupted"] = bool(same)
        result["shards"] = len(a)
    report = out / "train_report.json"
    if report.exists():
        unet = json.loads(report.read_text())["unet"]
        result["cache_seconds"] = unet["cache_seconds"]
        result["images_per_second_caching"] = round(args.n / max(unet["cache_seconds"], 1e-9), 2)
    result["cache_disk_gb"] = _du(out / "cache")
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check", "train", "resume"])
    parser.add_argument("--n", type=int, required=True, help="images")
    parser.add_argument("--work", default="/tmp/ldm-data-scale", help="where images, models and runs go")
    parser.add_argument("--model", choices=["small", "sd15"], default="small")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the project's)")
    parser.add_argument("--kill-after", type=float, default=30.0, help="resume: seconds before the SIGKILL")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per process (default: torch's)")
    parser.add_argument("--previous", default=None, help="train with the code of an earlier commit in this folder")
    parser.add_argument("--square", action="store_true", help="square images only (aspect 1:1)")
    parser.add_argument("--set", action="append", default=[], help="more key=value overrides")
    parser.add_argument("--out", type=Path, default=None, help="append the result as a JSON line here")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
