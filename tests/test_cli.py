import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import AutoencoderKL
from PIL import Image

from ldm_pipeline.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_generate_writes_one_png(tiny_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_dir),
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--seed",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert Image.open(out).size == (32, 32)
    assert str(out) in capsys.readouterr().out


def test_generate_grid_with_scheduler_and_size(tiny_dir, tmp_path):
    out = tmp_path / "grid.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_dir),
            "--prompt",
            "a red circle",
            "--negative-prompt",
            "blue",
            "--steps",
            "2",
            "--guidance",
            "3",
            "--num-images",
            "3",
            "--height",
            "16",
            "--width",
            "24",
            "--scheduler",
            "euler-a",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert Image.open(out).size == (2 * 24, 2 * 16)
    assert sorted(p.name for p in tmp_path.glob("grid-*.png")) == ["grid-0.png", "grid-1.png", "grid-2.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/folder"], "model folder not found: /no/such/folder"),
        (["--height", "15"], "`height` must be a positive multiple of the VAE factor 2"),
        (["--lora", "/no/such/lora"], "LoRA folder /no/such/lora: no pytorch_lora_weights.safetensors"),
    ],
)
def test_generate_errors_are_one_line(tiny_dir, tmp_path, capsys, args, message):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "a.png")]
    assert main(argv + args) == 2  # a repeated option: argparse keeps the last
    err = capsys.readouterr().err
    assert err.strip().startswith(f"ldm generate: error: {message}")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_folder_without_model_index_is_named(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "a.png")]) == 2
    assert "has no model_index.json" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_reports_bad_value_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldm_pipeline.cli",
            "generate",
            "--model",
            str(tmp_path / "missing"),
            "--prompt",
            "x",
            "--steps",
            "0",
            "--out",
            str(tmp_path / "a.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "--steps: must be a positive integer, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "--prompt", "x", "--seed", "99999999999999999999999"],
            "--seed: must be an integer from 0 to 9223",
        ),
        (["generate", "--prompt", "x", "--seed", "-3"], "argument --seed: must be an integer from 0"),
        (["eval", "--seed", "2.5"], "argument --seed: must be an integer, got '2.5'"),
        (["eval", "--seed", "-1"], "argument --seed: must be an integer from 0 to 9223372036854775807, got -1"),
        (["eval", "--seed", str(2**63)], "argument --seed: must be an integer from 0 to 9223372036854775807"),
        (["eval", "--num-samples", "ten"], "argument --num-samples: must be an integer, got 'ten'"),
    ],
)
def test_argument_errors_are_one_line_with_status_2(tiny_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as caught:
        main([args[0], "--model", str(tiny_dir), *args[1:], "--out", str(tmp_path / "a.png")])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_eval_writes_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["eval", "--model", str(tiny_dir), "--num-samples", "2", "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["num_samples"] == 2 and 0 <= report["all_correct"] <= 1 and report["clip_score"] is None
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse rejects an unknown dataset before any work
        main(["eval", "--model", str(tiny_dir), "--dataset", "faces", "--out", str(out)])
    assert "invalid choice: 'faces'" in capsys.readouterr().err


@pytest.mark.slow
def test_commands_print_no_notice_a_user_cannot_act_on(tmp_path):
    # transformers' "requires torchvision (not installed)" notice came on every command.
    proc = subprocess.run(
        [sys.executable, "-m", "ldm_pipeline.cli", "train", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"ldm train: error: config file not found: {tmp_path / 'none.yaml'}"]


def test_many_images_come_in_batches_each_with_its_own_seed(tiny_dir, tmp_path, capsys, monkeypatch):
    import ldm_pipeline.cli as cli

    args = ["generate", "--model", str(tiny_dir), "--prompt", "a red circle", "--steps", "2", "--seed", "5"]
    assert main([*args, "--num-images", "5", "--batch-size", "2", "--out", str(tmp_path / "many.png")]) == 0
    assert Image.open(tmp_path / "many.png").size == (3 * 32, 2 * 32)
    assert main([*args[:-1], "8", "--out", str(tmp_path / "alone.png")]) == 0  # --seed 8: image 3 of the run
    many, other, alone = (np.asarray(Image.open(tmp_path / n), int) for n in ("many-3.png", "many-2.png", "alone.png"))
    # The same noise; a batch of 2 and a batch of 1 round differently in the last bit at most.
    assert np.abs(many - alone).max() <= 2 and np.abs(other - alone).max() > 20
    monkeypatch.setattr(cli, "GRID_LIMIT", 2)
    capsys.readouterr()
    assert main([*args, "--num-images", "3", "--out", str(tmp_path / "nogrid.png")]) == 0
    assert "wrote 3 images as nogrid-N.png" in capsys.readouterr().out and not (tmp_path / "nogrid.png").exists()
    assert sorted(p.name for p in tmp_path.glob("nogrid-*.png")) == ["nogrid-0.png", "nogrid-1.png", "nogrid-2.png"]


def test_an_error_after_a_progress_bar_starts_its_own_line(tmp_path, capsys, monkeypatch):
    from ldm_pipeline.training.loop import NonFiniteError
    from tqdm.auto import tqdm

    import ldm_pipeline.cli as cli

    def fails_midway(args):
        bar = tqdm(total=10, desc="unet", disable=False)  # even where TQDM_DISABLE=1 is exported
        bar.update(3)
        raise NonFiniteError("unet: 6 steps in a row had a non-finite loss")

    monkeypatch.setattr(cli, "_train", fails_midway)
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\nldm train: error: unet: 6 steps in a row had a non-finite loss\n"), repr(err)


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [
        (KeyboardInterrupt(), 130, "ldm train: interrupted"),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 4 GB"),
            2,
            "ldm train: error: out of memory ([enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't",
        ),
    ],
)
def test_interrupts_and_allocation_failures_are_one_line(tmp_path, capsys, monkeypatch, raised, code, message):
    import ldm_pipeline.cli as cli

    def fails(args):
        raise raised

    monkeypatch.setattr(cli, "_train", fails)
    assert main(["train", str(tmp_path / "c.yaml")]) == code
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "bug",
    [RuntimeError("a bug in the code"), ValueError("a bug in the code"), OSError(5, "a bug in the code")],
)
def test_errors_that_are_not_the_users_keep_their_traceback(tmp_path, monkeypatch, bug):
    # A ValueError from inside torch or diffusers is a bug, not the user's mistake.
    import ldm_pipeline.cli as cli

    def fails(args):
        raise bug

    monkeypatch.setattr(cli, "_train", fails)
    with pytest.raises(type(bug), match="a bug in the code"):
        main(["train", str(tmp_path / "c.yaml")])


def test_the_users_errors_are_one_line_unless_a_traceback_is_asked_for(tmp_path, capsys, monkeypatch):
    from ldm_pipeline.training.config import ConfigError

    missing = tmp_path / "c.yaml"
    assert main(["train", str(missing)]) == 2
    assert capsys.readouterr().err == f"ldm train: error: config file not found: {missing}\n"
    # A path of the user's that the OS refuses is theirs too.
    args = ["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "no" / "a.png")]
    monkeypatch.setattr("ldm_pipeline.cli._generate", lambda a: a.out.write_bytes(b""))
    assert main(args) == 2
    assert "No such file or directory" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="config file not found"):
        main(["--traceback", "train", str(missing)])
    monkeypatch.setenv("LDM_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="config file not found"):
        main(["train", str(missing)])


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_dir, tmp_path, capsys):
    # A user's folder with one broken image, fine-tuning the tiny pipeline: the resolved config,
    # the data check's summary, each model's size and plan; no run folder appears.
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a picture {i}")
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("a broken picture")
    out = tmp_path / "run"
    args = ["train", "finetune", "--dry-run", "--output", str(out), f"pretrained={tiny_dir}", f"data.source={data}"]
    assert main([*args, "unet.steps=7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not out.exists()
    assert f"  pretrained: {tiny_dir}" in lines
    assert f"data: {data}: 3 of 4 images usable, 1 skipped (1 not an image file)" in lines
    vae = sum(p.numel() for p in AutoencoderKL.from_pretrained(tiny_dir / "vae").parameters())
    assert f"vae: from {tiny_dir} (not trained in this run); {vae / 1e3:.0f}K parameters" in lines
    unet = next(i for i, line in enumerate(lines) if line.startswith("unet: fine-tuned from"))
    assert lines[unet + 1].startswith("  plan: 7 steps × batch")
    assert lines[-1] == "stages to run: unet (dry run: nothing trained)"


def test_dry_run_of_a_shipped_recipe_names_its_targets_and_sizes(capsys):
    assert main(["train", "shapes", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "data: built-in shapes: 20,000 images at 32 px, 256 held out" in lines
    assert "unet: trained from zero; 6.7M parameters" in lines
    assert any(
        line.startswith("  plan: 3,300 steps (at most 40 min) × batch 64") and "stops at adherence 0.97" in line
        for line in lines
    )
    assert any("as many steps as fit in 12 min" in line and "held-out PSNR 31" in line for line in lines)


@pytest.mark.parametrize("seed", ["-1", str(2**32), "99999999999999999999999"])
def test_a_run_seed_out_of_range_is_one_line_for_every_verb_that_trains(tmp_path, capsys, seed):
    config = tmp_path / "seeded.yaml"
    config.write_text(f"model: tiny\nseed: {seed}\n")
    runs = [
        ["train", str(CONFIGS / "tiny.yaml"), "--output", str(tmp_path / "a"), f"seed={seed}"],
        ["train", str(config), "--output", str(tmp_path / "b")],
        ["train", str(CONFIGS / "tiny.yaml"), "--output", str(tmp_path / "c"), f"data.seed={seed}"],
        ["quickstart", "--output", str(tmp_path / "d"), f"seed={seed}"],
    ]
    for argv, key in zip(runs, ["seed", "seed", "data.seed", "seed"], strict=True):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err == f"ldm {argv[0]}: error: {key}: must be an integer from 0 to 4294967295 (2**32 - 1), got {seed}"
    assert not (tmp_path / "a" / "pipeline").exists() and not (tmp_path / "d" / "pipeline").exists()


def test_the_largest_run_seed_seeds_every_stream():
    from accelerate.utils import set_seed
    from ldm_pipeline.training.seeds import MAX_SEED, OFFSETS, seed_of

    for run_seed in (0, MAX_SEED - 2, MAX_SEED):
        seeds = [seed_of(run_seed, stream) for stream in OFFSETS]
        assert len(set(seeds)) == len(OFFSETS)  # no two streams share a seed
        for seed in seeds:
            set_seed(seed)  # accelerate (numpy) refuses anything outside 0..2**32 - 1
    assert seed_of(7, "unet.start") == 9  # seeds in the usual range are unchanged
