"""Log-likelihood of text continuations given an image and a prompt, for every supported VLM.

An answer is scored as lm-eval scores a multiple-choice option: as the continuation of the exact
prompt string. `split_context` (vlmexp.eval.prompt) splits the item's text into context and
continuation; the prefix is the processor's encoding of image + context (`encode_prefix`, image
placeholders expanded), and a continuation's ids are the tail of ONE tokenization of
context + continuation (`encode_continuation`: whole[len(context ids):], lm-eval's `_encode_pair`).
So an answer is tokenized the way it reads after the prompt: after Qwen's
`"<|im_start|>assistant\\n"` it is `red`, not the `Ġred` a word encoded alone with a space gets.

When a merge crosses the boundary (the context's ids are not a prefix of the whole text's ids,
e.g. "sha" + "pe"), context ids + whole[len(context ids):] is no tokenization of the text (the
seam can lose or repeat characters); lm-eval scores exactly that, and so does this module, which
keeps the prefix shared. Moving the context's trailing whitespace into the continuation makes
such merges rare. `encode_choices` checks that the processor's expanded prefix ends with the
text-only context's ids (it counts from the end, since the image expansion changes the length),
so that the continuation ids really continue the prefix.

`score_continuations` runs the prefix once with a KV cache, repeats the cache over the choices
and runs all choices as one right-padded batch (padding sits after every real token, so causal
attention never sees it). `score_continuations_naive` runs one full forward per choice; the tests
hold the two equal to 1e-4 on every architecture, and equal to one forward over the joint
tokenization of prompt + answer.

Architecture quirks, all keyed on the model's `config.model_type`:
  * PaliGemma (prefix-LM): the processor appends "\\n" to the prompt; it is dropped so the answer
    follows the prompt directly, as in `prompt + answer` training text. Prompt tokens carry
    token_type_ids 0 (bidirectional prefix), answer tokens 1 (causal suffix), as the processor's
    `suffix=` does.
  * Gemma 3: image tokens carry token_type_ids 1 (bidirectional image block); answer tokens 0.
  * Qwen2-VL / Qwen2.5-VL: `mm_token_type_ids` (1 on image pads) is built from the input ids when
    the processor does not return it; answer tokens get 0. With the cache, the model continues its
    3-D rope positions from the deltas it stored during the prefix forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmexp.errors import EvalError
from vlmexp.eval.prompt import split_context

_ANSWER_TOKEN_TYPE = {"paligemma": 1}  # token_type_ids of continuation tokens (default 0)
_DROP_KEYS = ("labels",)


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of one continuation: the sum over its tokens, and their count."""

    logprob: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.logprob / max(self.tokens, 1)


def model_type(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", ""))


def encode_prefix(processor: Any, image: Any, context: str, *, model_type: str = "") -> dict[str, torch.Tensor]:
    """Model inputs (batch of 1) for `image` + `context`, as the processor makes them.

    Example:
        >>> from vlmexp.zoo.tiny_processors import build_processor, random_image
        >>> enc = encode_prefix(build_processor("llava"), random_image(), "<image>\\nHi\\nAnswer:")
        >>> enc["input_ids"].shape[0]
        1
    """
    enc = processor(images=[image], text=[context], return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if k not in _DROP_KEYS and isinstance(v, torch.Tensor)}
    if model_type == "paligemma":
        newline = processor.tokenizer.encode("\n", add_special_tokens=False)
        ids = inputs["input_ids"]
        if newline and int(ids[0, -1]) == newline[-1]:
            seq_keys = [k for k, v in inputs.items() if v.dim() == 2 and v.shape == ids.shape]
            for k in seq_keys:
                inputs[k] = inputs[k][:, :-1]
    image_token_id = getattr(processor, "image_token_id", None)
    if model_type in ("qwen2_vl", "qwen2_5_vl") and "mm_token_type_ids" not in inputs:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token_id).long()
    return inputs


def encode_continuation(processor: Any, context: str, continuation: str) -> list[int]:
    """Token ids of `continuation` after `context`, as lm-eval takes them (no special tokens).

    context + continuation is tokenized as one string; the continuation's ids are that
    tokenization without its first len(ids of context) ids, whether or not a merge crossed the
    boundary (lm-eval's `_encode_pair`).

    Example:
        >>> from vlmexp.zoo.tokenizers import qwen2_tokenizer
        >>> tok = qwen2_tokenizer()
        >>> tok.convert_ids_to_tokens(encode_continuation(tok, "assistant", "\\nred"))
        ['Ċ', 're', 'd']
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    return list(whole[len(context_ids):])


def _check_boundary(tokenizer: Any, prefix_ids: list[int], context: str) -> None:
    """The expanded prefix must end as the text-only context does, counted from the end.

    Compared: the context's ids after its last special token (image placeholder, turn marker),
    less the first of them, which an expansion may change (Gemma 3 puts "\\n\\n" before the
    text that follows an image); at least the last id.
    """
    ids = tokenizer.encode(context, add_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    tail = next((len(ids) - i - 1 for i in range(len(ids) - 1, -1, -1) if ids[i] in special), len(ids))
    n = max(tail - 1, 1)
    if prefix_ids[-n:] != ids[-n:]:
        tokens = tokenizer.convert_ids_to_tokens
        raise EvalError(f"the processor's encoding of the prompt ends in {tokens(prefix_ids[-n:])}, "
                        f"the tokenizer's in {tokens(ids[-n:])}: answers would not continue the prompt")


def encode_choices(processor: Any, image: Any, prompt: str, answers: Sequence[str], *,
                   model_type: str = "") -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """The shared prefix (model inputs) and each answer's continuation ids for one image item.

    The context (`split_context`, the same for every answer) goes through the processor with the
    image; each answer's ids come from `encode_continuation`.

    Example:
        >>> from vlmexp.zoo.tiny_processors import build_processor, random_image
        >>> proc = build_processor("llava")
        >>> prefix, conts = encode_choices(proc, random_image(), "<image>\\nColour?\\nAnswer:", ["red"])
        >>> proc.tokenizer.convert_ids_to_tokens(conts[0])
        ['▁red']
    """
    pairs = [split_context(prompt, answer) for answer in answers]
    context = pairs[0][0] if pairs else prompt
    prefix = encode_prefix(processor, image, context, model_type=model_type)
    _check_boundary(getattr(processor, "tokenizer", processor), prefix["input_ids"][0].tolist(), context)
    continuations = []
    for answer, (_, continuation) in zip(answers, pairs, strict=True):
        ids = encode_continuation(processor, context, continuation)
        if not ids:
            raise EvalError(f"answer {answer!r} adds no tokens to the prompt {prompt!r}")
        continuations.append(ids)
    return prefix, continuations


def _extend_types(inputs: dict[str, torch.Tensor], n: int, mtype: str) -> dict[str, torch.Tensor]:
    """The per-token input tensors (other than ids) extended by `n` continuation tokens."""
    out = dict(inputs)
    if "attention_mask" in out:
        out["attention_mask"] = torch.cat([out["attention_mask"], out["attention_mask"].new_ones(1, n)], 1)
    if "token_type_ids" in out:
        tt = out["token_type_ids"]
        out["token_type_ids"] = torch.cat([tt, tt.new_full((1, n), _ANSWER_TOKEN_TYPE.get(mtype, 0))], 1)
    if "mm_token_type_ids" in out:
        mm = out["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([mm, mm.new_zeros(1, n)], 1)
    return out


def _to_model(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inputs on the model's device; pixel tensors in its floating dtype (e.g. bfloat16)."""
    param = next(model.parameters())
    return {k: v.to(param.device, dtype=param.dtype) if v.is_floating_point() else v.to(param.device)
            for k, v in inputs.items()}


def _gather(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _forget_rope_deltas(model: torch.nn.Module) -> None:
    """Qwen-VL keeps the rope deltas of its last image prefix and applies them to later cached
    steps; a prefix without an image does not replace them, so they are cleared first."""
    inner = getattr(model, "model", None)
    if getattr(inner, "rope_deltas", None) is not None:
        inner.rope_deltas = None


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module, prefix: dict[str, torch.Tensor], continuations: Sequence[Sequence[int]],
    *, batch_size: int = 16,
) -> list[ContinuationScore]:
    """Score each continuation given the prefix; the prefix runs once, with a KV cache.

    Example:
        >>> from vlmexp.zoo.tiny import build
        >>> from vlmexp.zoo.tiny_processors import build_processor, random_image
        >>> proc, model = build_processor("llava"), build("llava")
        >>> pre = encode_prefix(proc, random_image(), "<image>\\nWhat colour?\\nAnswer:")
        >>> [round(s.logprob, 1) < 0 for s in score_continuations(model, pre, [[5], [6, 7]])]
        [True, True]
    """
    if any(len(c) == 0 for c in continuations):
        raise ValueError("an empty continuation has no tokens to score")
    device = next(model.parameters()).device
    prefix = _to_model(model, prefix)
    _forget_rope_deltas(model)
    out = model(**prefix, use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    cache = out.cache if "cache" in out else out.past_key_values
    scores: list[ContinuationScore] = []
    longest = max(len(c) for c in continuations)
    if longest == 1:  # one-token answers: the prefix's last logits are all we need
        return [ContinuationScore(float(first[c[0]]), 1) for c in continuations]
    n_chunks = -(-len(continuations) // batch_size)
    if n_chunks > 1:  # each chunk repeats its own copy of the prefix cache (in place)
        import copy

        caches = [cache] + [copy.deepcopy(cache) for _ in range(n_chunks - 1)]
    else:
        caches = [cache]
    for chunk_no, start in enumerate(range(0, len(continuations), batch_size)):
        chunk = continuations[start:start + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        for row, c in enumerate(chunk):
            ids[row, : len(c)] = torch.as_tensor(c, device=device)
        chunk_cache = caches[chunk_no]
        chunk_cache.batch_repeat_interleave(len(chunk))
        if width > 1:
            logits = model(input_ids=ids[:, :-1], cache=chunk_cache, use_cache=True).logits
            rest = torch.log_softmax(logits.float(), -1)
            rest_scores = _gather(rest, ids[:, 1:])
        for row, c in enumerate(chunk):
            total = first[c[0]] + (rest_scores[row, : len(c) - 1].sum() if len(c) > 1 else 0.0)
            scores.append(ContinuationScore(float(total), len(c)))
    return scores


@torch.no_grad()
def score_continuations_naive(
    model: torch.nn.Module, prefix: dict[str, torch.Tensor], continuations: Sequence[Sequence[int]],
) -> list[ContinuationScore]:
    """Reference: one full forward over prompt + continuation ids per continuation."""
    device = next(model.parameters()).device
    mtype = model_type(model)
    prefix = _to_model(model, prefix)
    n_prefix = prefix["input_ids"].shape[1]
    scores = []
    for c in continuations:
        cont = torch.as_tensor([list(c)], device=device)
        inputs = _extend_types(prefix, len(c), mtype)
        inputs["input_ids"] = torch.cat([prefix["input_ids"], cont], 1)
        logits = model(**inputs).logits[0, n_prefix - 1 : -1]
        total = _gather(torch.log_softmax(logits.float(), -1), cont[0]).sum()
        scores.append(ContinuationScore(float(total), len(c)))
    return scores
