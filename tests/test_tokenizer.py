from transformers import CLIPTokenizer

from ldm_pipeline.tokenizer import VOCAB_SIZE, load_clip_tokenizer


def test_ids_equal_openai_clip():
    tok = load_clip_tokenizer()
    assert len(tok) == VOCAB_SIZE == 49408
    assert tok("a red circle on a white background").input_ids == [49406, 320, 736, 7117, 525, 320, 1579, 5994, 49407]
    # Digits split one per token and punctuation kept, as OpenAI's simple_tokenizer does.
    assert tok("Hello, World! 12").input_ids == [49406, 3306, 267, 1002, 256, 272, 273, 49407]


def test_pads_and_cuts_to_model_max_length():
    tok = load_clip_tokenizer(model_max_length=8)
    ids = tok(["a red circle", "a b c d e f g h i j"], padding="max_length", truncation=True).input_ids
    assert [len(x) for x in ids] == [8, 8]
    assert ids[0] == [49406, 320, 736, 7117, 49407, 49407, 49407, 49407]
    assert ids[1][0] == 49406 and ids[1][-1] == 49407


def test_saved_folder_reloads_from_tokenizer_json_and_from_vocab_files(tmp_path):
    tok = load_clip_tokenizer(model_max_length=24)
    tok.save_pretrained(tmp_path)
    tok.backend_tokenizer.model.save(str(tmp_path))
    text = "a green triangle on a black background"
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again.model_max_length == 24
    assert again(text).input_ids == tok(text).input_ids
    (tmp_path / "tokenizer.json").unlink()
    from_vocab = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    assert from_vocab(text).input_ids == tok(text).input_ids
