"""Training for the demo zoo: encode items the way the evaluator scores them, then a plain Adam loop.

An image item is `split_context(image_prompt(processor, question), answer)`: the context goes
through the processor with the image, the continuation's ids are `encode_continuation`'s (the tail
of one tokenization of context + continuation), then eos; the evaluator encodes with the same
two functions (`encode_choices`). A next-item item is `split_context(next_item_text(question),
answer)` tokenized the same way, lm-eval's rule. The loss is on the continuation and eos only; a
recitation is trained on every token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from vlmexp.eval.prompt import image_prompt, split_context
from vlmexp.eval.scorer import encode_continuation, encode_prefix

IGNORE = -100


@dataclass
class Encoded:
    """Right-padded token ids, loss labels and (for image items) pixel values, all as tensors."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows `index`, trimmed to their longest sequence, as model keyword arguments."""
        mask = self.attention_mask[index]
        width = int(mask.sum(1).max())
        out = {"input_ids": self.input_ids[index, :width], "attention_mask": mask[:, :width],
               "labels": self.labels[index, :width]}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values[index]
        return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids, mask, labels


def encode_image_items(
    processor: Any, items: Sequence[tuple[Image.Image, str, str]]
) -> Encoded:
    """(image, question, answer) triples as the evaluator would score them, answer + eos as labels."""
    tok = processor.tokenizer
    prompts: dict[str, list[int]] = {}  # the processor expands `<image>`; same for every image
    rows = []
    for image, question, answer in items:
        context, continuation = split_context(image_prompt(processor, question), answer)
        if context not in prompts:
            prompts[context] = encode_prefix(processor, image, context)["input_ids"][0].tolist()
        prompt = prompts[context]
        target = encode_continuation(tok, context, continuation) + [tok.eos_token_id]
        rows.append((prompt + target, [IGNORE] * len(prompt) + target))
    ids, mask, labels = _pad(rows, tok.pad_token_id)
    pixels = processor.image_processor(images=[it[0] for it in items], return_tensors="pt")
    return Encoded(ids, mask, labels, pixels["pixel_values"])


def encode_text_items(tokenizer: Any, items: Sequence[tuple[str, str | None]]) -> Encoded:
    """(prompt, answer) pairs: with an answer, labels are its continuation + eos; with None, all ids."""
    rows = []
    for prompt, answer in items:
        if answer is None:
            ids = _ids(tokenizer, prompt) + [tokenizer.eos_token_id]
            rows.append((ids, ids))
        else:
            context, continuation = split_context(prompt, answer)
            head = _ids(tokenizer, context)
            target = encode_continuation(tokenizer, context, continuation) + [tokenizer.eos_token_id]
            rows.append((head + target, [IGNORE] * len(head) + target))
    return Encoded(*_pad(rows, tokenizer.pad_token_id))


def train(
    model: torch.nn.Module,
    datasets: Sequence[Encoded],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool = True,
    warmup: int = 20,
) -> list[float]:
    """Adam for `steps` steps, cycling through `datasets` one batch each; returns the losses.

    The learning rate warms up linearly for `warmup` steps, then follows a cosine to zero.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        data = datasets[step % len(datasets)]
        index = torch.randint(len(data), (batch_size,), generator=gen)
        loss = model(**data.batch(index)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
