"""An OpenAI CLIP tokenizer that works offline.

The BPE merges are OpenAI CLIP's own (``bpe_simple_vocab_16e6.txt.gz``, bundled from the
MIT-licensed ``open_clip`` package; see ``assets/LICENSE-open_clip.txt``). The vocabulary is
derived from them exactly as OpenAI's ``simple_tokenizer.py`` does, so the ids equal those of
``openai/clip-vit-*`` tokenizers: a model trained here can take a pretrained CLIP text encoder
later, and the other way round.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

import torch
from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    data = resources.files("ldm_pipeline.assets").joinpath(_BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # OpenAI keeps the first 49152 - 256 - 2 merges after the version header line.
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"bundled CLIP vocabulary has {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def load_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Build OpenAI CLIP's BPE tokenizer from the bundled vocabulary, with no network.

    Args:
        model_max_length: the sequence length prompts are padded and cut to (start and end
            tokens included). OpenAI CLIP uses 77; small models can use fewer.

    Returns:
        A ``transformers.CLIPTokenizer`` whose ``save_pretrained`` writes the standard files.
    """
    if model_max_length < 3:
        raise ValueError(f"model_max_length must be at least 3, got {model_max_length}")
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=model_max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )


def token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids of ``texts`` padded and cut to the tokenizer's ``model_max_length``."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
