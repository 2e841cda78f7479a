"""How a question becomes model text: one place, shared by the evaluator and the zoo's training.

A multiple-choice item is scored as log p(continuation | context), where
`split_context(prompt, answer)` splits the item's text `prompt + delimiter + answer` as lm-eval
does. The evaluator (vlmexp.eval.scorer.encode_choices) and the zoo's training
(vlmexp.zoo.train) both split with it and both take the continuation's tokens from one
tokenization of the whole text, so what the zoo learns is what gets scored.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from vlmexp.errors import EvalError

ANSWER_DELIMITER = " "  # lm-eval's default `target_delimiter`
LETTERS = string.ascii_uppercase  # option labels, as VLMEvalKit's option columns A..Z
# VLMEvalKit's instruction line, trailing space included (vlmeval/dataset/image_mcq.py)
MMBENCH_INSTRUCTION = "Please select the correct answer from the options above. \n"


def split_context(prompt: str, answer: str) -> tuple[str, str]:
    """The (context, continuation) pair whose concatenation is the item's full text.

    The continuation is `ANSWER_DELIMITER + answer`, unless the prompt already ends in whitespace
    (a chat template's generation prompt such as Qwen's `"<|im_start|>assistant\\n"`): then no
    delimiter is added and, as lm-eval's `_encode_pair` does, the trailing whitespace moves from
    the context into the continuation, so that a tokenizer that glues a space or newline to the
    next word sees them together. (lm-eval drops the delimiter after a chat template, too.)

    Example:
        >>> split_context("<image>\\nWhat colour is the shape?\\nAnswer:", "red")
        ('<image>\\nWhat colour is the shape?\\nAnswer:', ' red')
        >>> split_context("<|im_start|>assistant\\n", "red")
        ('<|im_start|>assistant', '\\nred')
    """
    context = prompt.rstrip()
    if not context:
        raise ValueError("an empty prompt has no context to score an answer after")
    if context == prompt:
        return prompt, ANSWER_DELIMITER + answer
    return context, prompt[len(context):] + answer


def mmbench_text(question: str, options: Sequence[str], hint: str | None = None) -> str:
    """The MMBench question text: VLMEvalKit's layout, which the model is shown as the user text.

    VLMEvalKit's `ImageMCQDataset.build_prompt` (vlmeval/dataset/image_mcq.py) writes
    `Hint: {hint}\\n` (only when the row has a hint), `Question: {question}\\n`, then
    `Options:\\n`, one `{letter}. {option}\\n` per option and the instruction line
    `MMBENCH_INSTRUCTION`. The answer scored after it is the option's letter.

    Example:
        >>> mmbench_text("Colour?", ["red", "blue"], hint="Look.").splitlines()[:5]
        ['Hint: Look.', 'Question: Colour?', 'Options:', 'A. red', 'B. blue']
    """
    if len(options) > len(LETTERS):
        raise EvalError(f"{len(options)} options: MMBench letters go to {LETTERS[-1]}")
    text = f"Hint: {hint}\n" if hint is not None else ""
    text += f"Question: {question}\n"
    if options:
        text += "Options:\n"
        text += "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options, strict=False))
        text += MMBENCH_INSTRUCTION
    return text


def image_prompt(processor: Any, question: str, *, chat_template: bool | None = None) -> str:
    """The prompt text (with the processor's image placeholder, unexpanded) for one image question.

    With the processor's chat template (`chat_template` None: when it has one; True: required)
    the user turn holds the image and the question, and the generation prompt is added;
    otherwise (`False`, or no template) `"<image>\n{question}\nAnswer:"` with the processor's
    own image token (wrapped in its `vision_start_token` / `vision_end_token` when it has both,
    as Qwen-VL's image pads must be).

    Example:
        >>> class P:  # a processor without a chat template
        ...     image_token = "<image>"
        ...     chat_template = None
        >>> image_prompt(P(), "What colour is the shape?")
        '<image>\nWhat colour is the shape?\nAnswer:'
    """
    has_template = bool(getattr(processor, "chat_template", None))
    if chat_template and not has_template:
        raise EvalError(f"chat_template: true, but the {type(processor).__name__} has no chat "
                        f"template")
    if has_template and chat_template is not False:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = processor.image_token
    start, end = (getattr(processor, k, None) for k in ("vision_start_token", "vision_end_token"))
    if isinstance(start, str) and isinstance(end, str):
        image = f"{start}{image}{end}"
    return f"{image}\n{question}\nAnswer:"
