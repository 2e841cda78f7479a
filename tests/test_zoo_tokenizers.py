"""Real tokenizer kinds trained offline: their pipelines split text as the real ones do."""

from __future__ import annotations

import time

import pytest

from vlmexp.zoo import tokenizers
from vlmexp.zoo.tokenizers import build_tokenizer, sentencepiece_model

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
TEXTS = ["What colour is the shape?", "the shape is at the top left", "seven eight nine 1234",
         "Zebra quokka ünïcode", "two  spaces", "tab\tand newline\nhere"]


def _tokens(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_sentencepiece_kinds_match_sentencepiece(kind):
    """transformers' conversion of the SentencePiece model splits plain text as sentencepiece does
    (text that starts with a space aside: there the fast Llama pipeline, real ones too, adds no
    second "▁")."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model(kind))
    tok = build_tokenizer(kind)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert sp.get_piece_size() == tokenizers.SPM_VOCAB
    assert "<0x0A>" in tok.get_vocab() and "<0xFF>" in tok.get_vocab()  # byte fallback


def test_prefix_spaces():
    llama, gemma, qwen = (build_tokenizer(k) for k in ("llama", "gemma", "qwen2"))
    # Llama adds "▁" before the first word; Gemma and Qwen2 add nothing
    assert _tokens(llama, "red") == _tokens(llama, " red") == ["▁red"]
    assert _tokens(gemma, "red") == ["red"] and _tokens(gemma, " red") == ["▁red"]
    assert _tokens(qwen, " red") == ["Ġred"] and _tokens(qwen, "red") != ["Ġred"]
    # legacy Llama repeats the prefix space after a special token, as old checkpoints did
    legacy = build_tokenizer("llama", legacy=True)
    assert _tokens(llama, "<image>\nWhat") == ["<image>", "<0x0A>", "W", "hat"]
    assert _tokens(legacy, "<image>\nWhat") == ["<image>", "▁", "<0x0A>", "W", "hat"]
    assert llama.encode("red")[0] == llama.bos_token_id and gemma.encode("red")[0] == gemma.bos_token_id
    assert qwen.encode("red") == qwen.encode("red", add_special_tokens=False)  # Qwen2 adds no BOS


def test_qwen2_pre_tokenizer_is_qwen2s():
    import transformers as tf

    tok = build_tokenizer("qwen2")
    assert type(tok) is tf.Qwen2Tokenizer
    pipeline = tf.Qwen2Tokenizer().backend_tokenizer  # NFC, the GPT-4-style regex, byte level
    assert tok.backend_tokenizer.pre_tokenizer.__getstate__() == pipeline.pre_tokenizer.__getstate__()
    assert tok.backend_tokenizer.normalizer.__getstate__() == pipeline.normalizer.__getstate__()
    # contractions, single digits, a space before a word, a newline on its own
    words = [w for w, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("it's 12 a\nred")]
    assert words == ["it", "'s", "Ġ", "1", "2", "Ġa", "Ċ", "red"]


@pytest.mark.parametrize(("kind", "cls", "image_tokens"), [
    ("llama", "LlamaTokenizer", ["<image>"]),
    ("gemma", "GemmaTokenizer", ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]),
    ("qwen2", "Qwen2Tokenizer", ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]),
])
def test_image_placeholders_are_special_tokens(kind, cls, image_tokens):
    tok = build_tokenizer(kind)
    assert type(tok).__name__ == cls
    ids = tok.encode("".join(image_tokens), add_special_tokens=False)
    assert ids == tok.convert_tokens_to_ids(image_tokens)
    assert set(ids) <= set(tok.all_special_ids)
    assert tok.image_token_id == tok.convert_tokens_to_ids(tok.image_token)
    assert tok.decode(tok.encode("red " + "".join(image_tokens)), skip_special_tokens=True).strip() == "red"


@pytest.mark.parametrize(("kind", "expected"), [
    ("llama", "USER: <image>\nWhat colour is the shape? ASSISTANT:"),
    ("gemma", "<bos><start_of_turn>user\n<start_of_image>What colour is the shape?<end_of_turn>\n"
              "<start_of_turn>model\n"),
    ("qwen2", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<|vision_start|><|image_pad|><|vision_end|>What colour is the shape?<|im_end|>\n"
              "<|im_start|>assistant\n"),
])
def test_chat_templates_render_the_real_formats(kind, expected):
    tok = build_tokenizer(kind, chat_template=True)
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == expected
    assert build_tokenizer(kind).chat_template is None


def test_built_once_per_process_and_handed_out_as_copies():
    first = build_tokenizer("qwen2")
    first.add_tokens(["<mine>"])
    start = time.perf_counter()
    again = build_tokenizer("qwen2")
    assert time.perf_counter() - start < 0.5
    assert "<mine>" not in again.get_vocab() and len(again) == len(first) - 1
    with pytest.raises(KeyError, match="unknown tokenizer kind"):
        build_tokenizer("bert")
