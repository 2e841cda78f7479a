"""Tiny offline processors for the tiny models of `vlmexp.zoo.tiny`, one per VLM architecture.

Each is the architecture's own processor class where it builds without torchvision (LLaVA,
LLaVA-NeXT, Idefics3, PaliGemma, Gemma 3) around a locally trained `tokenizers` BPE; Qwen2-VL and
Qwen2.5-VL get `vlmexp.processors.QwenVLImageProcessor`, which pairs the PIL `Qwen2VLImageProcessorPil` with the
tokenizer and expands `<|image_pad|>` by hand (their processor class needs torchvision).

The BPE has no byte alphabet (a `Metaspace` pre-tokenizer, like SentencePiece), so short answer
words such as " red" stay one token. Special tokens sit at the ids the tiny configs expect
(`vlmexp.zoo.tiny.IMAGE_TOKEN` = 300, ...); ids between the trained vocabulary and 300 are
`<unused_N>` fillers.

Example:
    >>> from vlmexp.zoo.tiny_processors import build_processor
    >>> proc = build_processor("llava")
    >>> proc.tokenizer.convert_tokens_to_ids("<image>")
    300
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from vlmexp.processors import QwenVLImageProcessor
from vlmexp.zoo import tiny

_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos, unk as in the tiny configs
# Answer words first and repeated, so the merges make each of them one token ("▁red").
_ANSWER_WORDS = "red green blue yellow purple orange circle square triangle star yes no"
_WORDS = (
    "what which is the a of shape colour color image question answer describe comes next "
    "one two three four five six seven eight nine ten"
)
_CORPUS = [
    *[_ANSWER_WORDS] * 8,
    _WORDS,
    "What colour is the shape? Which shape is shown? Answer: red",
    "Question: What comes next? Answer:",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0 1 2 3 4 5 6 7 8 9 . , : ; ? ! ' \" ( ) [ ] { } - _ + = / * # % & < > | @ ~ ^ $ `",
    "\n \n\n",
]


@lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    """A small BPE trained once on `_CORPUS` (deterministic), as tokenizers JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = sorted(set("".join(_CORPUS).replace(" ", "▁")))
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=_SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator([" " + line for line in _CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def build_tokenizer(specials: dict[int, str], extra: tuple[str, ...] = ()) -> Any:
    """A `PreTrainedTokenizerFast` with `specials` ({id: token}, ids >= 300) and `extra` tokens.

    `extra` tokens (e.g. Idefics3's `<global-img>`) take filler ids below 300.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_bpe_json())
    first = min(specials)
    fillers = [*extra]
    fillers += [f"<unused_{i}>" for i in range(first - tok.get_vocab_size() - len(fillers))]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fillers])
    for idx in range(first, max(specials) + 1):
        name = specials.get(idx, f"<unused_{idx}>")
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        assert tok.token_to_id(name) == idx, (name, idx)
    assert tok.get_vocab_size() <= tiny.VOCAB
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="right",
    )


def _with_named(tok: Any, **named: str) -> Any:
    """Register named special tokens (`tok.image_token`, `tok.image_token_id`, ...)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", padding_side="right", extra_special_tokens=named,
    )


def llava() -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tok = _with_named(build_tokenizer({tiny.IMAGE_TOKEN: "<image>"}), image_token="<image>")
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
    )


def llava_next() -> Any:
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tok = _with_named(build_tokenizer({tiny.IMAGE_TOKEN: "<image>"}), image_token="<image>")
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
    )
    return LlavaNextProcessor(
        image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
    )


def qwen2_vl() -> Any:
    from transformers import Qwen2VLImageProcessorPil

    specials = {
        tiny.IMAGE_TOKEN: "<|image_pad|>", tiny.VISION_START: "<|vision_start|>",
        tiny.VISION_END: "<|vision_end|>", tiny.VIDEO_TOKEN: "<|video_pad|>",
    }
    tok = _with_named(build_tokenizer(specials), image_token="<|image_pad|>")
    images = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32},
    )
    return QwenVLImageProcessor(images, tok)


def idefics3() -> Any:
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    tok = _with_named(
        build_tokenizer({tiny.IMAGE_TOKEN: "<image>"},
                        extra=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")),
        image_token="<image>",
    )
    images = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
    )
    return Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4)


def paligemma() -> Any:
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    tok = _with_named(build_tokenizer({tiny.IMAGE_TOKEN: "<image>"}), image_token="<image>")
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    images.image_seq_length = 16
    return PaliGemmaProcessor(image_processor=images, tokenizer=tok)


def gemma3() -> Any:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    specials = {tiny.IMAGE_TOKEN: "<image_soft_token>", tiny.BOI_TOKEN: "<start_of_image>",
                tiny.EOI_TOKEN: "<end_of_image>"}
    tok = _with_named(
        build_tokenizer(specials), image_token="<image_soft_token>", boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
    )
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4)


BUILDERS: dict[str, Callable[[], Any]] = {
    "llava": llava,
    "llava_next": llava_next,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_vl,
    "idefics3": idefics3,
    "paligemma": paligemma,
    "gemma3": gemma3,
}


def build_processor(name: str) -> Any:
    """The tiny processor for the tiny VLM `name` (one of `vlmexp.zoo.tiny.VLMS`)."""
    if name not in BUILDERS:
        raise KeyError(f"no tiny processor for {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name]()


def text_tokenizer(name: str = "llava") -> Any:
    """The tokenizer of `build_processor(name)`, e.g. for lm-eval on a tiny text model."""
    return build_processor(name).tokenizer


def random_image(seed: int = 0, size: int = 32) -> Any:
    """A deterministic RGB noise image (PIL), for tests and benchmarks."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def for_tokenizer(kind: str, tokenizer: Any) -> Any:
    """The processor of the tiny VLM that a real tokenizer kind (`vlmexp.zoo.tokenizers`) belongs
    to, around that tokenizer and with its chat template: the architecture's own processor class
    (LLaVA, Gemma 3), or for Qwen2-VL the image-only processor that stands in for it here."""
    import transformers as tf

    from vlmexp.zoo.tokenizers import VLM_OF

    tiny_proc = build_processor(VLM_OF[kind])  # its image processor and settings
    if kind == "llama":
        return tf.LlavaProcessor(
            image_processor=tiny_proc.image_processor, tokenizer=tokenizer,
            patch_size=tiny_proc.patch_size,
            vision_feature_select_strategy=tiny_proc.vision_feature_select_strategy,
            num_additional_image_tokens=tiny_proc.num_additional_image_tokens,
            chat_template=tokenizer.chat_template)
    if kind == "gemma":
        return tf.Gemma3Processor(image_processor=tiny_proc.image_processor, tokenizer=tokenizer,
                                  image_seq_length=tiny_proc.image_seq_length,
                                  chat_template=tokenizer.chat_template)
    return QwenVLImageProcessor(tiny_proc.image_processor, tokenizer)  # takes its chat template
