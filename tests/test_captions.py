"""Tag shuffling with keep_tokens, tag dropout, and the embeddings of captions the cache lacks."""

import pytest
import torch
from ldm_pipeline.training.cache import cached_texts
from ldm_pipeline.training.captions import CaptionEmbedder, vary_caption
from ldm_pipeline.training.config import ConfigError, config_from_dict

from ldm_pipeline.tokenizer import token_ids

CAPTION = "sks dog, sitting, grass, sunny, red collar, park"


def test_shuffled_tags_keep_their_first_n_in_place_and_lose_none():
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        varied = vary_caption(CAPTION, shuffle=True, keep_tokens=2, tag_dropout=0.0, generator=generator)
        tags = varied.split(", ")
        assert tags[:2] == ["sks dog", "sitting"]
        assert sorted(tags) == sorted(CAPTION.split(", "))
        seen.add(varied)
    assert len(seen) > 10  # the other four tags really move (4! = 24 orders)


def test_tag_dropout_drops_only_tags_after_the_kept_ones_at_about_its_rate():
    generator = torch.Generator().manual_seed(0)
    kept = []
    for _ in range(400):
        tags = vary_caption(CAPTION, shuffle=False, keep_tokens=1, tag_dropout=0.3, generator=generator).split(", ")
        assert tags[0] == "sks dog"
        rest = tags[1:]
        assert rest == [t for t in CAPTION.split(", ")[1:] if t in rest]  # order kept without shuffle
        kept.append(len(rest))
    assert abs(sum(kept) / (400 * 5) - 0.7) < 0.05


def test_a_caption_without_tags_is_left_as_written_and_draws_nothing():
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    assert vary_caption("a photo of a dog", True, 0, 0.5, generator) == "a photo of a dog"
    assert torch.equal(generator.get_state(), before)
    # Spaces and empty tags are tidied; keep_tokens beyond the tag count keeps them all.
    assert vary_caption(" a ,b,, c ", True, 5, 0.9, generator) == "a, b, c"


def test_embedder_uses_the_cache_and_encodes_what_it_lacks_once(pipe, tmp_path):
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    captions = ["a, b", "c"]
    embeds, index = cached_texts(encoder, tokenizer, captions, tmp_path)
    row_of = {"": 0, **dict(zip(captions, index.tolist(), strict=True))}
    embedder = CaptionEmbedder(embeds, row_of, encoder, tokenizer)
    out = embedder(["a, b", "b, a", "", "b, a"])
    with torch.no_grad():
        direct = encoder(token_ids(tokenizer, ["a, b", "b, a", ""]))[0]
    torch.testing.assert_close(out[:3], direct, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], out[3]) and not torch.allclose(out[0], out[1])  # order matters to the encoder
    assert embedder.encoded == 1  # "b, a" once; the rest came from the cache
    embedder(["b, a"])
    assert embedder.encoded == 1  # memoised


def test_embedder_memo_is_bounded(pipe, tmp_path):
    embeds, _ = cached_texts(pipe.text_encoder, pipe.tokenizer, [], tmp_path)
    embedder = CaptionEmbedder(embeds, {"": 0}, pipe.text_encoder, pipe.tokenizer, memo_size=2)
    out = embedder(["x, y", "y, x", "z, x"])
    assert out.shape[0] == 3 and len(embedder.memo) == 2 and embedder.encoded == 3


@pytest.mark.parametrize(
    ("unet", "message"),
    [
        ({"tag_dropout": 1.0}, r"unet.tag_dropout: must be in \[0, 1\)"),
        ({"keep_tokens": -1}, r"unet.keep_tokens: must be >= 0"),
        ({"shuffle_tags": "yes"}, r"unet.shuffle_tags"),
    ],
)
def test_caption_option_errors_name_the_key(unet, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"unet": unet})
