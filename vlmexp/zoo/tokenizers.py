"""Real tokenizer kinds, trained offline in a fraction of a second: test and demo helpers.

Three pipelines that real VLM checkpoints ship, each trained here on a small corpus of the demo's
words and loaded through transformers' own classes, so that they split text the way the real ones
do (only their vocabularies are small):

- `llama_tokenizer` (LLaVA-1.5, Llama 2): SentencePiece BPE with byte fallback and a "▁" prefix
  space; `legacy=True` repeats the prefix space after every special token, as old Llama
  tokenizers did. Loaded by `LlamaTokenizer.from_pretrained` from the SentencePiece model alone,
  which converts it with `transformers.convert_slow_tokenizer.SentencePieceExtractor` (in
  transformers 5.24, `LlamaConverter(...).converted()` fails on a BPE model; this is the path
  `from_pretrained` takes for a checkpoint that ships only `tokenizer.model`).
- `gemma_tokenizer` (Gemma 3): SentencePiece BPE with byte fallback and no prefix space;
  `GemmaTokenizer.from_pretrained` from the SentencePiece model, the same way.
- `qwen2_tokenizer` (Qwen2-VL): byte-level BPE behind Qwen2's GPT-4-style regex pre-tokenizer;
  `Qwen2Tokenizer` from the trained vocabulary and merges.

Each carries its image placeholder special tokens as the real one does, and, on request, the real
model's chat template (sources beside each template). Production code never imports this module.

Example:
    >>> from vlmexp.zoo.tokenizers import qwen2_tokenizer
    >>> tok = qwen2_tokenizer(chat_template=True)
    >>> tok.convert_ids_to_tokens(tok.encode(" red\\nred", add_special_tokens=False))
    ['Ġred', 'Ċ', 're', 'd']
"""

from __future__ import annotations

import copy
import io
import json
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from vlmexp.zoo import data

# Copied verbatim from llava-hf/llava-1.5-7b-hf's chat_template.json, as vendored (under that name)
# in openvinotoolkit/openvino.genai src/cpp/src/chat_template_fallback_map.hpp.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + "
    "': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next "
    "#}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ "
    "content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Copied verbatim from Qwen/Qwen2-VL-2B-Instruct's chat template, as vendored in
# xorbitsai/inference xinference/model/llm/llm_family.json ("qwen2-vl-instruct", whose specs pin
# Qwen/Qwen2-VL-2B-Instruct at revision 096da3b96240e3d66d35be0e5ccbe282eea8d6b1).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for "
    "message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if "
    "add_vision_id %}Picture {{ image_count.value }}: {% endif "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in "
    "content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ "
    "video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in "
    "content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# Copied verbatim from google/gemma-3-4b-it's chat template, as vendored in xorbitsai/inference
# xinference/model/llm/llm_family.json ("gemma-3-it", whose first spec is google/gemma-3-4b-it).
# transformers' tests/models/gemma3/test_processing_gemma3.py carries a shortened copy.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

# Special tokens in the real vocabularies' order (LLaVA-1.5 appends <image> and <pad>; Qwen2-VL's
# sit above its BPE vocabulary; Gemma 3's are SentencePiece control pieces).
LLAVA_ADDED = ("<image>", "<pad>")
QWEN2_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
GEMMA3_CONTROL = ("<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>")

SPM_VOCAB = 768  # 256 byte pieces, the corpus's characters and about 450 merges
BPE_VOCAB = 512  # 256 bytes and about 250 merges: each demo answer word is one token either way


def corpus() -> list[str]:
    """The training text: the demo's questions, answers and prompt words, one sentence a line.

    Every line is repeated so that the answer words become pieces of their own.
    """
    answers = [*data.COLOURS, *data.SHAPES, *data.POSITIONS]
    lines = [
        data.COLOUR_QUESTION, data.SHAPE_QUESTION, data.POSITION_QUESTION, data.CAPTION_QUESTION,
        "Question: What comes after seven? Answer: eight",
        "USER: What colour is the shape? ASSISTANT: red",
        "You are a helpful assistant.", "system user assistant model",
        *(f"Answer: {a}" for a in answers), *(f"the shape is at the {p}" for p in data.POSITIONS),
        " ".join(answers), *(" ".join(words) for words in data.LISTS.values()),
        "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z 0 1 2 3 4 5 6 7 8 9",
        ". , : ; ? ! ' \" ( ) [ ] - _ + = / * # % & < > | @",
    ]
    return lines * 8


def _train_spm(**options: Any) -> bytes:
    """A SentencePiece BPE model (serialized) trained on `corpus()`, deterministically."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe",
        vocab_size=SPM_VOCAB, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        **options,
    )
    return model.getvalue()


@cache
def sentencepiece_model(kind: str) -> bytes:
    """The serialized SentencePiece model behind `llama_tokenizer` or `gemma_tokenizer`."""
    if kind == "llama":  # ids 0-2: <unk>, <s>, </s>; a "▁" before the first word
        return _train_spm(add_dummy_prefix=True)
    if kind == "gemma":  # ids 0-3: <pad>, <eos>, <bos>, <unk>; newlines are pieces of their own
        return _train_spm(
            add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
            eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            control_symbols=list(GEMMA3_CONTROL), user_defined_symbols=["\n", "\n\n"],
        )
    raise KeyError(f"no SentencePiece model for {kind!r}; known: llama, gemma")


def _from_spm(cls: type, model: bytes, **kwargs: Any) -> Any:
    """`cls.from_pretrained` on a folder holding only `tokenizer.model`: transformers' own path
    from a SentencePiece model to its fast pipeline."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(model)
        return cls.from_pretrained(folder, **kwargs)


@cache
def _llama(legacy: bool) -> Any:
    from transformers import LlamaTokenizer

    # Llama's SentencePiece never saw a newline: "\n" falls back to the byte piece <0x0A>
    tok = _from_spm(LlamaTokenizer, sentencepiece_model("llama"), legacy=legacy,
                    add_prefix_space=True, add_bos_token=True, add_eos_token=False,
                    extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"pad_token": "<pad>"})  # after <image>, as in llava-hf's vocabulary
    return tok


@cache
def _gemma() -> Any:
    from transformers import GemmaTokenizer

    return _from_spm(GemmaTokenizer, sentencepiece_model("gemma"), add_bos_token=True,
                     extra_special_tokens={"image_token": "<image_soft_token>",
                                           "boi_token": "<start_of_image>",
                                           "eoi_token": "<end_of_image>"})


@cache
def _qwen2() -> Any:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Train under the very pipeline Qwen2Tokenizer builds (NFC, GPT-4 regex split, byte level)
    pipeline = Qwen2Tokenizer()._tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update({t: len(vocab) + i for i, t in enumerate(QWEN2_VL_SPECIALS)})  # their real order
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[tuple(m) for m in model["merges"]], eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token=None,
        extra_special_tokens={"image_token": "<|image_pad|>", "vision_start_token": "<|vision_start|>",
                              "vision_end_token": "<|vision_end|>"},
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_SPECIALS],
                   special_tokens=True)
    return tok


def _fresh(tok: Any, template: str | None) -> Any:
    """A copy of a cached tokenizer (callers may change theirs), with `template` set."""
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def llama_tokenizer(*, chat_template: bool = False, legacy: bool = False) -> Any:
    """LLaVA-1.5's kind: SentencePiece BPE, byte fallback, "▁" prefix space, `<image>` and `<pad>`
    added after the vocabulary; with `chat_template`, llava-hf/llava-1.5-7b-hf's template."""
    return _fresh(_llama(legacy), LLAVA_CHAT_TEMPLATE if chat_template else None)


def gemma_tokenizer(*, chat_template: bool = False) -> Any:
    """Gemma 3's kind: SentencePiece BPE, byte fallback, no prefix space, image control tokens;
    with `chat_template`, google/gemma-3-4b-it's template."""
    return _fresh(_gemma(), GEMMA3_CHAT_TEMPLATE if chat_template else None)


def qwen2_tokenizer(*, chat_template: bool = False) -> Any:
    """Qwen2-VL's kind: byte-level BPE behind the GPT-4-style regex, `<|image_pad|>` between
    `<|vision_start|>` and `<|vision_end|>`; with `chat_template`, Qwen2-VL-2B-Instruct's."""
    return _fresh(_qwen2(), QWEN2_VL_CHAT_TEMPLATE if chat_template else None)


BUILDERS: dict[str, Callable[..., Any]] = {
    "llama": llama_tokenizer,
    "gemma": gemma_tokenizer,
    "qwen2": qwen2_tokenizer,
}
# The tiny VLM (vlmexp.zoo.tiny) each kind belongs to, and the names of its image tokens there.
VLM_OF = {"llama": "llava", "gemma": "gemma3", "qwen2": "qwen2_vl"}


def build_tokenizer(kind: str, **options: Any) -> Any:
    """The tokenizer of `kind` (one of BUILDERS), e.g. `build_tokenizer("qwen2", chat_template=True)`."""
    if kind not in BUILDERS:
        raise KeyError(f"unknown tokenizer kind {kind!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[kind](**options)
