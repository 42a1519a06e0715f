"""Caption variation during UNet training, and the text embeddings of captions the cache lacks.

Tag-style captions ("sks dog, sitting, grass, sunny") are commonly trained with the order of the
tags shuffled and single tags dropped, so that the model does not tie a concept to a tag's
position or to the presence of every other tag; the first ``keep_tokens`` tags (usually the
trigger word and class) stay in front (the convention of kohya-ss' sd-scripts, whose
``shuffle_caption``, ``keep_tokens`` and ``caption_tag_dropout_rate`` these are).

The run's cache holds the embedding of every caption as written. A shuffled or thinned caption
is a new string with its own embedding (the text encoder sees token order): there are up to
n!·2ⁿ of them per caption, so they cannot all be computed in advance. `CaptionEmbedder` looks each
batch's captions up in the cache and encodes the ones it lacks with the frozen text encoder in
that step, keeping up to ``memo_size`` of them for reuse (a small DreamBooth set repeats its
variants).
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_pipeline.tokenizer import token_ids


def vary_caption(
    text: str, shuffle: bool, keep_tokens: int, tag_dropout: float, generator: torch.Generator, separator: str = ","
) -> str:
    """``text``'s comma-separated tags after the first ``keep_tokens``, each dropped with
    probability ``tag_dropout`` and (with ``shuffle``) put in random order; joined with ", ".

    A caption with no separator is one tag: it is left as written (so plain sentences pass
    through a run configured for tags unchanged). Draws come from ``generator`` only when a
    caption has tags to vary, so runs with both options off draw nothing.
    """
    if separator not in text:
        return text
    tags = [t.strip() for t in text.split(separator) if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    if not tail:
        return ", ".join(head)
    if tag_dropout > 0:
        kept = torch.rand(len(tail), generator=generator) >= tag_dropout
        tail = [t for t, k in zip(tail, kept.tolist(), strict=True) if k]
    if shuffle and len(tail) > 1:
        tail = [tail[i] for i in torch.randperm(len(tail), generator=generator).tolist()]
    return ", ".join(head + tail)


class CaptionEmbedder:
    """Embeddings for a batch of captions: the cached row where there is one, else encoded now.

    Args:
        embeds: the cached embeddings (`training.cache.cached_texts`), row 0 the empty caption.
        row_of: caption → row of ``embeds``.
        memo_size: captions encoded in the loop that are kept for reuse (oldest dropped first).
    """

    def __init__(
        self,
        embeds: torch.Tensor,
        row_of: dict[str, int],
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        memo_size: int = 4096,
    ):
        self.embeds, self.row_of = embeds, row_of
        self.text_encoder, self.tokenizer, self.memo_size = text_encoder, tokenizer, memo_size
        self.memo: dict[str, torch.Tensor] = {}
        self.encoded = 0  # captions encoded in the loop (not cached, not memoised)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = sorted({t for t in texts if t not in self.row_of and t not in self.memo})
        now: dict[str, torch.Tensor] = {}  # this call's encodings, whatever the memo keeps
        if missing:
            ids = token_ids(self.tokenizer, missing).to(self.text_encoder.device)
            fresh = self.text_encoder(ids)[0].float().cpu()
            self.encoded += len(missing)
            now = dict(zip(missing, fresh, strict=True))
            for text, embed in now.items():
                if len(self.memo) >= self.memo_size:
                    self.memo.pop(next(iter(self.memo)))
                self.memo[text] = embed
        rows = [self.embeds[self.row_of[t]] if t in self.row_of else now.get(t, self.memo.get(t)) for t in texts]
        return torch.stack(rows)
