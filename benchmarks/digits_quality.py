"""Quality of a from-zero digits run: classifier accuracy on generated digits, and wall time.

Trains ``configs/digits.yaml`` (unless ``--run`` names a finished run folder), then scores the
pipeline at its default steps and guidance with ``ldm eval``'s digits metric: an SVM fitted on
the real digits classifies one generated image per prompt ("a handwritten digit 7", ...), and
its accuracy on held-out real digits is the baseline.

Usage::

    python benchmarks/digits_quality.py --output runs/bench-digits
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _runs import trained_pipeline

from ldm_pipeline.evaluation import evaluate

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/bench-digits"))
    parser.add_argument("--run", type=Path, default=None, help="score this finished run instead of training")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    results: dict = {}
    run, pipe = trained_pipeline(CONFIG, args.output, args.run, args.overrides, results)
    results["final"], _ = evaluate(pipe, "digits", args.num_samples, seed=1, clip_dir=run / "clip")
    (run / "digits_quality.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(
        f"digit accuracy {results['final']['digit_accuracy']:.3f} on {args.num_samples} prompts "
        f"(classifier on real digits: {results['final']['classifier_accuracy_on_real']:.3f})"
    )


if __name__ == "__main__":
    main()
