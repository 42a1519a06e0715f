"""``ldm data check``: what a source holds and what training would skip, before a run starts."""

from __future__ import annotations

import statistics
from collections import Counter

from .buckets import make_buckets
from .decode import DEFAULT_MAX_PIXELS
from .prepare import assign_buckets, scan
from .sources import load_source


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def check_source(
    source: str,
    caption_column: str | None = None,
    image_column: str | None = None,
    split: str = "train",
    resolution: int | None = None,
    bucket_step: int = 64,
    max_aspect: float = 2.0,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    tokenizer=None,
) -> dict:
    """Decode every image of ``source`` as training would and describe what it found.

    Returns a dict with counts, image sizes, caption statistics (words, and with a
    ``tokenizer`` the captions longer than its context, which training truncates), the aspect
    buckets images would go to (with a ``resolution``) and every skipped file with its reason.
    """
    ds = load_source(source, caption_column, image_column, split)
    found = scan(ds, background, max_pixels)
    captions = [c for caps in found.captions for c in caps]
    words = [len(c.split()) for c in captions]
    report: dict = {
        "source": str(source),
        "rows": found.total,
        "usable": len(found.rows),
        "skipped": len(found.skipped),
        "summary": found.summary(),
        "width": _spread([w for w, _ in found.sizes]),
        "height": _spread([h for _, h in found.sizes]),
        "common_sizes": [{"size": f"{w}x{h}", "images": n} for (w, h), n in Counter(found.sizes).most_common(5)],
        "captions": {
            "total": len(captions),
            "images_with_several": sum(len(caps) > 1 for caps in found.captions),
            "distinct": len(set(captions)),
            "words": _spread(words),
        },
        "skipped_files": [{"item": s.item, "reason": s.reason} for s in found.skipped],
    }
    if tokenizer is not None and captions:
        # In chunks: the token ids of every caption at once take more memory than the rest.
        lengths = [
            len(ids)
            for start in range(0, len(captions), 1024)
            for ids in tokenizer(captions[start : start + 1024])["input_ids"]
        ]
        report["captions"]["tokens"] = _spread(lengths)
        report["captions"]["truncated"] = sum(n > tokenizer.model_max_length for n in lengths)
    if resolution is not None and found.sizes:
        chosen = assign_buckets(found.sizes, make_buckets(resolution, bucket_step, max_aspect), 1)
        report["buckets"] = {f"{w}x{h}": n for (w, h), n in sorted(Counter(chosen).items())}
    return report


def format_report(report: dict) -> str:
    """The report as lines for a terminal."""
    lines = [f"{report['source']}: {report['summary']}"]
    if report["usable"]:
        w, h = report["width"], report["height"]
        lines.append(f"width  min {w['min']} median {w['median']} max {w['max']}")
        lines.append(f"height min {h['min']} median {h['median']} max {h['max']}")
        lines.append("common sizes: " + ", ".join(f"{s['size']} ({s['images']})" for s in report["common_sizes"]))
        c = report["captions"]
        lines.append(
            f"captions: {c['total']} ({c['distinct']} distinct, {c['images_with_several']} images with several); "
            f"words min {c['words']['min']} median {c['words']['median']} max {c['words']['max']}"
        )
        if "tokens" in c:
            lines.append(f"tokens: max {c['tokens']['max']}; {c['truncated']} captions longer than the context")
    if "buckets" in report:
        lines.append("buckets: " + ", ".join(f"{b} ({n})" for b, n in report["buckets"].items()))
    for item in report["skipped_files"]:
        lines.append(f"skip {item['item']}: {item['reason']}")
    return "\n".join(lines)
