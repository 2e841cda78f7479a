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

`score_items` scores several items at once. Up to `batch_size` prefixes run as one left-padded
batch (attention mask and position ids make each row see only its own tokens, at the positions
it has alone), with logits at each row's last position only (`logits_to_keep=1`), not at every
prefix position × the whole vocabulary. Answers of one token are then scored; longer answers run
from the prefix batch's KV cache, each row of the cache taken once per answer, up to `batch_size`
answers per forward (right-padded: padding sits after every real token, so causal attention
never sees it), with logits at the answers' positions (and that padding) only. The float32
log-softmax runs over blocks of rows, so neither step holds more than a batch's logits at the
positions it reads. `score_continuations` is the same for one item.
`score_continuations_naive` runs one full forward per choice; the tests hold the batched scores
equal to it and to one item per forward (1e-5) on every architecture, and equal to one forward
over the joint tokenization of prompt + answer. Every supported architecture batches: padding
changes its scores by float32 rounding only.

Architecture quirks, all keyed on the model's `config.model_type`:
  * PaliGemma (prefix-LM): the processor appends "\\n" to the prompt; it is dropped so the answer
    follows the prompt directly, as in `prompt + answer` training text. Prompt tokens carry
    token_type_ids 0 (bidirectional prefix), answer tokens 1 (causal suffix), as the processor's
    `suffix=` does. Its positions count from 1; left padding takes token type 0, and the
    attention mask keeps padding out of the bidirectional prefix.
  * Gemma 3: image tokens carry token_type_ids 1 (bidirectional image block); answer tokens 0.
  * Qwen2-VL / Qwen2.5-VL: `mm_token_type_ids` (1 on image pads) is built from the input ids when
    the processor does not return it; answer tokens get 0. Their 3-D rope positions come from the
    model's own `get_rope_index` over the padded batch (it skips padding), and answers continue
    at the largest prefix position + 1; the model's stored rope deltas are never read.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmexp.errors import EvalError
from vlmexp.eval.prompt import split_context

_ANSWER_TOKEN_TYPE = {"paligemma": 1}  # token_type_ids of continuation tokens (default 0)
_POSITION_OFFSET = {"paligemma": 1}  # the first token's position id (default 0)
_MROPE = ("qwen2_vl", "qwen2_5_vl")  # 3-D rope positions from the model's own rope index
_DROP_KEYS = ("labels",)
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
_SPECIAL_ID_KEYS = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id", "boi_token_index", "eoi_token_index")
_LOGSOFTMAX_ELEMENTS = 1 << 22  # floats per block of the log-softmax (16 MiB in float32)

# An item as `encode_choices` returns it: the prefix's model inputs and each answer's ids.
EncodedItem = tuple[dict[str, torch.Tensor], Sequence[Sequence[int]]]


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
    tokenizer = getattr(processor, "tokenizer", processor)
    bos = getattr(tokenizer, "bos_token", None)
    # a chat template that writes the BOS itself (Gemma's) must not get a second one
    extra = {"add_special_tokens": False} if bos and context.startswith(bos) else {}
    enc = processor(images=[image], text=[context], return_tensors="pt", **extra)
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


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[row, targets[row, k]] for logits [rows, vocab], targets [rows, k].

    The float32 log-softmax runs over blocks of rows, so its temporary stays near
    `_LOGSOFTMAX_ELEMENTS` floats whatever the number of rows.
    """
    step = max(1, _LOGSOFTMAX_ELEMENTS // max(logits.shape[-1], 1))
    parts = [torch.log_softmax(logits[i:i + step].float(), -1).gather(-1, targets[i:i + step])
             for i in range(0, logits.shape[0], step)]
    return torch.cat(parts) if parts else logits.new_zeros(targets.shape, dtype=torch.float32)


def _pad_id(model: torch.nn.Module) -> int:
    """A token id for left padding that no architecture reads as an image or vision marker."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    special = {getattr(c, k, None) for c in (config, text) for k in _SPECIAL_ID_KEYS}
    candidates = [getattr(text, "pad_token_id", None), 0, 1, 2, 3]
    return next(int(c) for c in candidates if isinstance(c, int) and c not in special)


def _signature(prefix: dict[str, torch.Tensor]) -> tuple:
    """Prefixes with equal signatures stack into one batch: the same inputs, and per-image
    tensors (pixels, grids) whose shapes agree beyond their first dimension."""
    return tuple(sorted((k, () if k in _TOKEN_KEYS else tuple(v.shape[1:]))
                        for k, v in prefix.items()))


def _batches(items: Sequence[EncodedItem], batch_size: int) -> list[list[int]]:
    """The items' indices in forwards of up to `batch_size` prefixes that stack (`_signature`).

    Prefixes of one length fill batches of their own, which need no padding: a padded row's
    scores differ from its unpadded ones by float32 rounding (attention over a longer, masked
    key range). The rest (each length's last, partial batch) are sorted by length and padded.
    """
    runs: dict[tuple, list[int]] = {}
    for i, (prefix, continuations) in enumerate(items):
        if continuations:
            runs.setdefault((_signature(prefix), prefix["input_ids"].shape[1]), []).append(i)
    batches: list[list[int]] = []
    rest: dict[tuple, list[int]] = {}
    for (signature, _), run in sorted(runs.items(), key=lambda kv: kv[0][1]):
        full = len(run) - len(run) % batch_size
        batches += [run[i:i + batch_size] for i in range(0, full, batch_size)]
        rest.setdefault(signature, []).extend(run[full:])
    for run in rest.values():
        batches += [run[i:i + batch_size] for i in range(0, len(run), batch_size)]
    return batches


def _collate(prefixes: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One left-padded batch of prefixes (each a batch of 1), with its attention mask.

    Token tensors are padded on the left (ids with `pad_id`, the rest with 0), so that every
    prefix ends at the last column; per-image tensors are concatenated along their first
    dimension (a Qwen-VL prefix's flattened patches, too).
    """
    prefixes = [{"attention_mask": torch.ones_like(p["input_ids"]), **p} for p in prefixes]
    width = max(p["input_ids"].shape[1] for p in prefixes)
    batch: dict[str, torch.Tensor] = {}
    for key in prefixes[0]:
        if key in _TOKEN_KEYS:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat([F.pad(p[key], (width - p[key].shape[1], 0), value=fill)
                                    for p in prefixes])
        else:
            batch[key] = torch.cat([p[key] for p in prefixes])
    return batch


def _positions(model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor,
               mtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix's position ids (what each model uses for an unpadded prefix, on its real
    tokens) and, per row, the position of the token after it.

    Qwen-VL: its own 3-D rope index (`get_rope_index`, padding-aware); the next text token
    continues at the largest prefix position + 1 on all three axes. Other models: 1-D positions
    counted over real tokens, from `_POSITION_OFFSET` (PaliGemma counts from 1).
    """
    if mtype in _MROPE:
        ids = batch["input_ids"]
        types = batch.get("mm_token_type_ids", torch.zeros_like(ids))
        positions, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=mask)
        following = positions.masked_fill(~mask.bool()[None], 0).amax(dim=(0, 2)) + 1
        return positions, following
    offset = _POSITION_OFFSET.get(mtype, 0)
    counted = mask.long().cumsum(-1)
    return (counted - 1).clamp(min=0) + offset, counted[:, -1] + offset


def _select_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A cache holding `rows` of `cache` (rows may repeat); `cache` itself is left as it is."""
    chosen = copy.copy(cache)
    chosen.layers = [copy.copy(layer) for layer in cache.layers]
    chosen.batch_select_indices(rows)
    return chosen


def _score_batch(model: torch.nn.Module, items: Sequence[EncodedItem], *, batch_size: int,
                 mtype: str, pad_id: int) -> list[list[ContinuationScore]]:
    """Score the choices of several items whose prefixes run as one left-padded batch."""
    device = next(model.parameters()).device
    batch = _collate([_to_model(model, prefix) for prefix, _ in items], pad_id)
    mask = batch["attention_mask"]
    positions, following = _positions(model, batch, mask, mtype)
    longer = [(b, j) for b, (_, conts) in enumerate(items) for j, c in enumerate(conts) if len(c) > 1]
    out = model(**batch, position_ids=positions, use_cache=bool(longer), logits_to_keep=1)
    firsts = torch.zeros(len(items), max(len(conts) for _, conts in items), dtype=torch.long,
                         device=device)
    for b, (_, conts) in enumerate(items):
        firsts[b, : len(conts)] = torch.as_tensor([c[0] for c in conts], device=device)
    first = _token_logprobs(out.logits[:, -1], firsts)
    totals = [[first[b, j] for j in range(len(conts))] for b, (_, conts) in enumerate(items)]
    cache = (out.cache if "cache" in out else out.past_key_values) if longer else None
    del out
    for start in range(0, len(longer), batch_size):  # answers' further tokens, from the cache
        chunk = longer[start:start + batch_size]
        rows = torch.as_tensor([b for b, _ in chunk], device=device)
        width = max(len(items[b][1][j]) for b, j in chunk) - 1
        ids = torch.zeros(len(chunk), width + 1, dtype=torch.long, device=device)
        for r, (b, j) in enumerate(chunk):
            ids[r, : len(items[b][1][j])] = torch.as_tensor(items[b][1][j], device=device)
        steps = following[rows, None] + torch.arange(width, device=device)
        if mtype in _MROPE:
            steps = steps[None].expand(3, -1, -1)
        logits = model(input_ids=ids[:, :-1], position_ids=steps, cache=_select_rows(cache, rows),
                       attention_mask=torch.cat([mask[rows], mask.new_ones(len(chunk), width)], 1),
                       use_cache=True).logits
        rest = _token_logprobs(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1, 1))
        rest = rest.view(len(chunk), width)
        for r, (b, j) in enumerate(chunk):
            totals[b][j] = totals[b][j] + rest[r, : len(items[b][1][j]) - 1].sum()
    return [[ContinuationScore(float(t), len(c)) for t, c in zip(ts, conts, strict=True)]
            for ts, (_, conts) in zip(totals, items, strict=True)]


@torch.no_grad()
def score_items(
    model: torch.nn.Module, items: Sequence[EncodedItem], *, batch_size: int = 16,
) -> list[list[ContinuationScore]]:
    """Score each item's continuations given its prefix: `items` are (prefix, continuations)
    pairs as `encode_choices` returns them; the result holds one list of scores per item.

    Up to `batch_size` prefixes run in one forward (left-padded; items whose image tensors
    differ in shape go into different forwards), which computes logits at each prefix's last
    position only and keeps a KV cache when an answer has more than one token; the answers'
    further tokens then run from that cache, up to `batch_size` answers per forward.

    Example:
        >>> from vlmexp.zoo.tiny import build
        >>> from vlmexp.zoo.tiny_processors import build_processor, random_image
        >>> proc, model = build_processor("llava"), build("llava")
        >>> items = [encode_choices(proc, random_image(i), "<image>\\nColour?\\nAnswer:", ["red", "blue"])
        ...          for i in range(3)]
        >>> [len(scores) for scores in score_items(model, items, batch_size=2)]
        [2, 2, 2]
    """
    for _, continuations in items:
        if any(len(c) == 0 for c in continuations):
            raise ValueError("an empty continuation has no tokens to score")
    mtype = model_type(model)
    pad_id = _pad_id(model)
    scores: list[list[ContinuationScore]] = [[] for _ in items]
    for chosen in _batches(items, batch_size):
        batch = _score_batch(model, [items[i] for i in chosen], batch_size=batch_size,
                             mtype=mtype, pad_id=pad_id)
        for i, item_scores in zip(chosen, batch, strict=True):
            scores[i] = item_scores
    return scores


def score_continuations(
    model: torch.nn.Module, prefix: dict[str, torch.Tensor], continuations: Sequence[Sequence[int]],
    *, batch_size: int = 16,
) -> list[ContinuationScore]:
    """Score each continuation given one prefix (`score_items` for a single item).

    Example:
        >>> from vlmexp.zoo.tiny import build
        >>> from vlmexp.zoo.tiny_processors import build_processor, random_image
        >>> proc, model = build_processor("llava"), build("llava")
        >>> pre = encode_prefix(proc, random_image(), "<image>\\nWhat colour?\\nAnswer:")
        >>> [round(s.logprob, 1) < 0 for s in score_continuations(model, pre, [[5], [6, 7]])]
        [True, True]
    """
    return score_items(model, [(prefix, continuations)], batch_size=batch_size)[0]


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
