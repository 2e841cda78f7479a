"""How a question becomes model text: one place, shared by the evaluator and the zoo's training.

A multiple-choice item is scored as log p(ANSWER_PREFIX + choice | prompt). The zoo trains on
exactly `image_prompt(...) + ANSWER_PREFIX + answer`, so what it learns is what gets scored.
"""

from __future__ import annotations

from typing import Any

ANSWER_PREFIX = " "


def image_prompt(processor: Any, question: str) -> str:
    """The prompt text (with the processor's image placeholder, unexpanded) for one image question.

    Uses the processor's chat template when it has one, else `"<image>\\n{question}\\nAnswer:"`
    with the processor's own image token (wrapped in its `vision_start_token` / `vision_end_token`
    when it has both, as Qwen-VL's image pads must be).

    Example:
        >>> class P:  # a processor without a chat template
        ...     image_token = "<image>"
        ...     chat_template = None
        >>> image_prompt(P(), "What colour is the shape?")
        '<image>\\nWhat colour is the shape?\\nAnswer:'
    """
    if getattr(processor, "chat_template", None):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = processor.image_token
    start, end = (getattr(processor, k, None) for k in ("vision_start_token", "vision_end_token"))
    if isinstance(start, str) and isinstance(end, str):
        image = f"{start}{image}{end}"
    return f"{image}\n{question}\nAnswer:"
