"""The prefix-shared scorer equals one full forward per choice, on every tiny architecture, and an
answer is scored as the continuation of the exact prompt string (lm-eval's rule), on real
tokenizer kinds with and without their chat templates."""

from __future__ import annotations

import copy
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlmexp.errors import EvalError
from vlmexp.eval import scorer
from vlmexp.eval.prompt import ANSWER_DELIMITER, image_prompt, split_context
from vlmexp.eval.scorer import (
    encode_choices,
    encode_continuation,
    encode_prefix,
    model_type,
    score_continuations,
    score_continuations_naive,
    score_items,
)
from vlmexp.zoo.tiny import LLMS, VLMS, build, build_for_tokenizer
from vlmexp.zoo.tiny_processors import random_image
from vlmexp.zoo.tokenizers import VLM_OF, build_tokenizer

CHOICES = ["red", "green blue", "a small red circle", "yellow star cat dog"]
QUESTION = "What colour is the shape?"


def _choice_inputs(proc, name, image=None):
    prompt = image_prompt(proc, QUESTION)
    return encode_choices(proc, image or random_image(3), prompt, CHOICES, model_type=name)


@pytest.mark.parametrize("name", VLMS)
def test_shared_prefix_equals_naive(name, tiny, tiny_processor):
    model, proc = tiny(name), tiny_processor(name)
    prefix, conts = _choice_inputs(proc, model_type(model))
    assert (prefix["input_ids"] == model.config.image_token_id if hasattr(model.config, "image_token_id")
            else prefix["input_ids"] == model.config.image_token_index).any()
    assert len({len(c) for c in conts}) > 1  # ragged: exercises the right padding
    fast = score_continuations(model, prefix, conts, batch_size=3)  # two chunks: 3 + 1
    naive = score_continuations_naive(model, prefix, conts)
    for f, n, c in zip(fast, naive, conts, strict=True):
        assert f.tokens == n.tokens == len(c)
        assert f.logprob == pytest.approx(n.logprob, abs=1e-4)
        assert f.logprob < 0
    # the scores differ between choices (a scorer that ignored the choice would fail here)
    assert len({round(s.logprob, 3) for s in fast}) == len(CHOICES)


def test_scores_depend_on_image(tiny, tiny_processor):
    model, proc = tiny("llava"), tiny_processor("llava")
    a = score_continuations(model, *_choice_inputs(proc, "llava", random_image(0)))[1].logprob
    b = score_continuations(model, *_choice_inputs(proc, "llava", random_image(1)))[1].logprob
    assert abs(a - b) > 1e-4


def test_one_token_answers_use_prefix_logits_only(tiny, tiny_processor):
    model, proc = tiny("idefics3"), tiny_processor("idefics3")
    prefix, conts = encode_choices(proc, random_image(), image_prompt(proc, "Colour?"), ["red", "blue"])
    assert [len(c) for c in conts] == [1, 1]
    with torch.no_grad():
        logits = model(**prefix).logits[0, -1]
    expected = torch.log_softmax(logits, -1)[[c[0] for c in conts]].tolist()
    got = [s.logprob for s in score_continuations(model, prefix, conts)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert score_continuations(model, prefix, conts)[0].mean == pytest.approx(expected[0], abs=1e-5)


def test_empty_continuation_is_an_error():
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(build("llava"), {"input_ids": torch.tensor([[5]])}, [[]])


def test_paligemma_prompt_drops_processor_newline(tiny, tiny_processor):
    proc = tiny_processor("paligemma")
    prompt = image_prompt(proc, "Colour?")
    raw = proc(images=[random_image()], text=[prompt], return_tensors="pt")["input_ids"][0]
    enc = encode_prefix(proc, random_image(), prompt, model_type="paligemma")
    newline = proc.tokenizer.encode("\n", add_special_tokens=False)
    assert raw[-1].item() == newline[-1]
    assert enc["input_ids"][0].tolist() == raw[:-1].tolist()
    assert proc.tokenizer.decode(enc["input_ids"][0, -3:]).endswith(":")
    assert set(enc["token_type_ids"][0].tolist()) == {0}
    # without the drop the prefix would end in "\n" where the text-only prompt ends in ":"
    with pytest.raises(EvalError, match="would not continue the prompt"):
        encode_choices(proc, random_image(), prompt, ["red"], model_type="")


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_gets_mm_token_types(name, tiny, tiny_processor):
    """3-D rope positions need mm_token_type_ids (1 on image pads): with the processor's ones the
    cached scorer equals the full forward (the cache continues the rope deltas); all-zero ones,
    which put the image on 1-D text positions, give other scores."""
    model, proc = copy.deepcopy(tiny(name)), tiny_processor(name)
    with torch.no_grad():  # sharper attention, so that positions move the scores well above noise
        for key, p in model.named_parameters():
            if "language_model" in key and ("q_proj" in key or "k_proj" in key):
                p.mul_(4.0)
    prefix, conts = _choice_inputs(proc, name)
    image = prefix["input_ids"] == model.config.image_token_id
    assert image.sum() == 4 and torch.equal(prefix["mm_token_type_ids"].bool(), image)
    with_types = [s.logprob for s in score_continuations(model, prefix, conts)]
    naive = [s.logprob for s in score_continuations_naive(model, prefix, conts)]
    assert with_types == pytest.approx(naive, abs=1e-5)
    zeros = {**prefix, "mm_token_type_ids": torch.zeros_like(prefix["mm_token_type_ids"])}
    for score in (score_continuations, score_continuations_naive):
        other = [s.logprob for s in score(model, zeros, conts)]
        assert max(abs(a - b) for a, b in zip(other, with_types, strict=True)) > 1e-3
    if name == "qwen2_5_vl":  # it runs without them too (1-D positions), and scores otherwise
        bare = {k: v for k, v in prefix.items() if k != "mm_token_type_ids"}
        other = [s.logprob for s in score_continuations_naive(model, bare, conts)]
        assert max(abs(a - b) for a, b in zip(other, with_types, strict=True)) > 1e-3


def test_qwen_text_prefix_after_an_image_prefix(tiny, tiny_processor):
    """Qwen-VL keeps the rope deltas of its last image forward and adds them to later cached steps
    that come without positions; the scorer gives every step its positions, so a text prefix
    scored after an image forward is scored as on a fresh model."""
    model, proc = copy.deepcopy(tiny("qwen2_vl")), tiny_processor("qwen2_vl")
    model.model.rope_deltas = None
    ids = proc.tokenizer.encode("What colour is the shape? Answer:", add_special_tokens=False)
    cont = proc.tokenizer.encode(" red green", add_special_tokens=False)
    assert len(cont) > 1  # scored from the cache
    fresh = score_continuations(model, {"input_ids": torch.tensor([ids])}, [cont])[0].logprob
    score_continuations_naive(model, *_choice_inputs(proc, "qwen2_vl"))  # stores its deltas
    assert model.model.rope_deltas is not None and int(model.model.rope_deltas.abs().max()) > 0
    again = score_continuations(model, {"input_ids": torch.tensor([ids])}, [cont])[0].logprob
    assert again == pytest.approx(fresh, abs=1e-6)
    assert fresh == pytest.approx(
        score_continuations_naive(model, {"input_ids": torch.tensor([ids])}, [cont])[0].logprob, abs=1e-5)


# ---- several items per forward -----------------------------------------------------------

QUESTIONS = ["What colour is the shape?", "Shape?", "Is there a big round object in the middle of it?"]
SIZES = [(32, 32), (32, 64), (64, 32), (48, 80), (32, 32), (64, 64)]


def _image(seed: int, size: tuple[int, int]):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def _items(proc, mtype: str) -> list:
    """Items whose prompts differ in length (left padding), whose images differ in size (Qwen's
    grids, LLaVA-NeXT's crops) and whose 2-4 answers have 1 to 7 tokens."""
    return [encode_choices(proc, _image(i, size), image_prompt(proc, QUESTIONS[i % 3]),
                           CHOICES[: 2 + i % 3], model_type=mtype) for i, size in enumerate(SIZES)]


def _logprobs(scores) -> list[float]:
    return [s.logprob for s in scores]


@pytest.mark.parametrize("name", VLMS)
def test_batched_items_equal_one_by_one(name, tiny, tiny_processor):
    model, proc = tiny(name), tiny_processor(name)
    items = _items(proc, model_type(model))
    assert len({prefix["input_ids"].shape[1] for prefix, _ in items}) > 2
    batched = score_items(model, items, batch_size=4)
    assert len(batched) == len(items)
    for (prefix, conts), scores in zip(items, batched, strict=True):
        assert [s.tokens for s in scores] == [len(c) for c in conts]
        alone = _logprobs(score_continuations(model, prefix, conts))
        assert _logprobs(scores) == pytest.approx(alone, abs=1e-5)
        assert _logprobs(scores) == pytest.approx(_logprobs(score_continuations_naive(model, prefix, conts)),
                                                  abs=1e-5)
    # the items' scores differ, so that a batch that mixed up its rows would fail above
    assert len({round(s[1].logprob, 5) for s in batched}) >= len(QUESTIONS)


@pytest.mark.parametrize("name", LLMS)
def test_batched_text_prefixes_equal_one_by_one(name, tiny):
    model = tiny(name)
    g = torch.Generator().manual_seed(0)
    items = [({"input_ids": torch.randint(3, 290, (1, 5 + 7 * i), generator=g)},
              [torch.randint(3, 290, (1 + (i + j) % 4,), generator=g).tolist() for j in range(3)])
             for i in range(5)]
    batched = score_items(model, items, batch_size=3)
    for (prefix, conts), scores in zip(items, batched, strict=True):
        assert _logprobs(scores) == pytest.approx(_logprobs(score_continuations(model, prefix, conts)), abs=1e-5)
        assert _logprobs(scores) == pytest.approx(_logprobs(score_continuations_naive(model, prefix, conts)),
                                                  abs=1e-5)


def test_equal_lengths_batch_unpadded(tiny, tiny_processor):
    """Prefixes of one length fill batches of their own, without padding (which changes scores
    by float32 rounding); the rest are padded together."""
    model, proc = tiny("llava"), tiny_processor("llava")
    prompts = [image_prompt(proc, q) for q in ("Colour?", "Shape?", "Colour?", "Shape?", "Colour?")]
    items = [encode_choices(proc, random_image(i), p, ["red", "blue"]) for i, p in enumerate(prompts)]
    lengths = [prefix["input_ids"].shape[1] for prefix, _ in items]
    assert lengths[0] == lengths[2] == lengths[4] != lengths[1] == lengths[3]
    seen = []
    hook = model.register_forward_pre_hook(lambda _, __, kw: seen.append(kw["attention_mask"].clone()),
                                           with_kwargs=True)
    try:
        batched = score_items(model, items, batch_size=2)
    finally:
        hook.remove()
    # whole batches of one length (shorter first), then the rest: colour, colour | shape, shape | colour
    short, long = sorted(lengths[:2])
    assert [tuple(m.shape) for m in seen] == [(2, short), (2, long), (1, lengths[0])]
    assert all(bool(m.all()) for m in seen)
    for (prefix, conts), scores in zip(items, batched, strict=True):
        assert _logprobs(scores) == pytest.approx(_logprobs(score_continuations(model, prefix, conts)),
                                                  abs=1e-6)


@pytest.mark.parametrize("name", [*VLMS, *LLMS])
def test_logits_only_where_read(name, tiny, tiny_processor):
    """The prefix forward projects one position per item onto the vocabulary, not every prefix
    position; the answers' forwards project only the positions whose next token is scored."""
    model = tiny(name)
    if name in VLMS:
        proc = tiny_processor(name)
        items = [encode_choices(proc, random_image(i), image_prompt(proc, QUESTIONS[i]), CHOICES,
                                model_type=model_type(model)) for i in range(3)]
    else:
        items = [({"input_ids": torch.arange(10, 30 + 5 * i)[None]}, [[5], [6, 7, 8], [9, 10]]) for i in range(3)]
    shortest = min(prefix["input_ids"].shape[1] for prefix, _ in items)
    longer = [len(c) for _, conts in items for c in conts if len(c) > 1]
    shapes = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _, args, __: shapes.append(tuple(args[0].shape[:-1])))
    try:
        score_items(model, items, batch_size=len(longer))
    finally:
        hook.remove()
    assert max(longer) - 1 < shortest
    assert shapes == [(3, 1), (len(longer), max(longer) - 1)]


def _rope_positions(model, run) -> list:
    """The position ids each forward's rotary embedding gets while `run()` runs, one per forward."""
    decoder = model.get_decoder()
    forwards: list[list] = []
    def record(_, args, kwargs):
        forwards[-1].append(args[1] if len(args) > 1 else kwargs["position_ids"])

    hooks = [decoder.register_forward_pre_hook(lambda *_: forwards.append([])),
             decoder.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return [calls[0] for calls in forwards]


@pytest.mark.parametrize("name", [*VLMS, *LLMS])
def test_padded_rows_get_the_positions_of_one_forward(name, tiny, tiny_processor):
    """Each left-padded row, and each answer after it, gets the rotary positions the model gives
    the same tokens in one unpadded forward over prompt + answer (PaliGemma's count from 1,
    Qwen-VL's are 3-D: a constant shift would go unseen by the scores, not here)."""
    model = tiny(name)
    if name in VLMS:
        proc = tiny_processor(name)
        items = [encode_choices(proc, random_image(i), image_prompt(proc, q), [CHOICES[2]],
                                model_type=model_type(model)) for i, q in enumerate(QUESTIONS[1::-1])]
    else:
        items = [({"input_ids": torch.arange(10, 20 + 5 * i)[None]}, [[5, 6, 7]]) for i in range(2)]
    lengths = [prefix["input_ids"].shape[1] for prefix, _ in items]
    assert lengths[0] < lengths[1]  # ascending: the batch keeps this order
    prefix_pos, answer_pos = _rope_positions(model, lambda: score_items(model, items))
    for row, ((prefix, (cont,)), n) in enumerate(zip(items, lengths, strict=True)):
        (alone,) = _rope_positions(model, partial(score_continuations_naive, model, prefix, [cont]))
        assert torch.equal(prefix_pos[..., row, -n:], alone[..., 0, :n])
        assert torch.equal(answer_pos[..., row, : len(cont) - 1], alone[..., 0, n:-1])


def test_one_token_answers_need_no_cache(tiny, tiny_processor):
    model, proc = tiny("llava"), tiny_processor("llava")
    items = [encode_choices(proc, random_image(i), image_prompt(proc, q), ["red", "blue"])
             for i, q in enumerate(QUESTIONS)]
    calls = []
    hook = model.register_forward_pre_hook(lambda _, __, kw: calls.append(kw["use_cache"]), with_kwargs=True)
    try:
        scores = score_items(model, items)
    finally:
        hook.remove()
    assert calls == [False]  # one forward for three items, without a KV cache
    for item, item_scores in zip(items, scores, strict=True):
        assert _logprobs(item_scores) == pytest.approx(_logprobs(score_continuations_naive(model, *item)),
                                                       abs=1e-5)


def test_log_softmax_runs_in_blocks(monkeypatch):
    logits = torch.randn(10, 50, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    targets = torch.randint(0, 50, (10, 2), generator=torch.Generator().manual_seed(1))
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets)
    rows = []
    log_softmax = torch.log_softmax

    def spy(x, dim):
        rows.append((x.shape[0], x.dtype))
        return log_softmax(x, dim)

    monkeypatch.setattr(scorer, "_LOGSOFTMAX_ELEMENTS", 150)  # 3 rows of 50
    monkeypatch.setattr(torch, "log_softmax", spy)
    got = scorer._token_logprobs(logits, targets)
    assert rows == [(3, torch.float32)] * 3 + [(1, torch.float32)]
    assert torch.equal(got, expected)


# ---- real tokenizer kinds: answers as continuations of the exact prompt ----------------------

ANSWERS = ["red", "top left", "yellow star cat"]
KINDS = [("llama", {}), ("llama", {"legacy": True}), ("gemma", {}), ("qwen2", {})]


@pytest.fixture(scope="module")
def kind_model():
    cache: dict[str, torch.nn.Module] = {}

    def get(kind: str, tokenizer) -> torch.nn.Module:
        if kind not in cache:
            cache[kind] = build_for_tokenizer(VLM_OF[kind], tokenizer, seed=1)
        return cache[kind]

    return get


def _joint_logprobs(model, proc, image, text: str, n: int, mtype: str) -> tuple[list[int], float]:
    """The processor's ids of the whole text (image expanded) and, from ONE forward over them,
    the summed log-probability of their last `n` tokens."""
    inputs = encode_prefix(proc, image, text, model_type=mtype)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        logits = model(**inputs).logits[0, -n - 1:-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[-n:, None]).sum()
    return ids.tolist(), float(lp)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize(("kind", "options"), KINDS, ids=["llama", "llama_legacy", "gemma", "qwen2"])
def test_answer_scored_as_joint_tokenization(kind, options, chat, kind_model, kind_processor):
    tok = build_tokenizer(kind, chat_template=chat, **options)
    proc = kind_processor(kind, tok)
    model = kind_model(kind, tok)
    mtype = model_type(model)
    image = random_image(5)
    prompt = image_prompt(proc, QUESTION)
    assert bool(proc.chat_template) == chat
    prefix, conts = encode_choices(proc, image, prompt, ANSWERS, model_type=mtype)
    fast = score_continuations(model, prefix, conts, batch_size=2)
    for answer, cont, score in zip(ANSWERS, conts, fast, strict=True):
        context, continuation = split_context(prompt, answer)
        ids, joint = _joint_logprobs(model, proc, image, context + continuation, len(cont), mtype)
        assert ids == prefix["input_ids"][0].tolist() + cont  # no merge across the boundary here
        assert score.logprob == pytest.approx(joint, abs=1e-5)
        assert score.tokens == len(cont)
    # after a generation prompt that ends in a newline the answer starts without a space: the
    # old rule (the answer encoded alone, after a space) gives other tokens there
    alone = [tok.encode(ANSWER_DELIMITER + a, add_special_tokens=False) for a in ANSWERS]
    ends_in_newline = prompt.endswith("\n")
    assert ends_in_newline == (chat and kind in ("gemma", "qwen2"))
    for cont, old in zip(conts, alone, strict=True):
        assert (cont != old) == ends_in_newline
        if ends_in_newline:
            assert tok.convert_ids_to_tokens(cont[:1]) in (["Ċ"], ["\n"])


def test_qwen_chat_answer_tokens(kind_processor):
    tok = build_tokenizer("qwen2", chat_template=True)
    prompt = image_prompt(kind_processor("qwen2", tok), QUESTION)
    assert prompt.endswith("<|im_start|>assistant\n")
    context, continuation = split_context(prompt, "red")
    assert (context, continuation) == (prompt[:-1], "\nred")
    assert tok.convert_ids_to_tokens(encode_continuation(tok, context, continuation)) == ["Ċ", "re", "d"]
    assert tok.convert_ids_to_tokens(tok.encode(" red", add_special_tokens=False)) == ["Ġred"]


def _lm_eval_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's own `_encode_pair` (causal backend), on `tok` without special tokens."""
    from lm_eval.api.model import TemplateLM

    lm = SimpleNamespace(backend="causal", tok_encode=lambda s, **_: tok.encode(s, add_special_tokens=False))
    return TemplateLM._encode_pair(lm, context, continuation)


@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen2"])
def test_continuation_ids_equal_lm_evals(kind):
    """split_context + encode_continuation give lm-eval's ids: target_delimiter " ", or "" after
    a chat template (whose generation prompt ends in whitespace)."""
    tok = build_tokenizer(kind)
    prompts = ["<image>\nWhat colour is the shape?\nAnswer:", "Answer:\n", "USER: Colour? ASSISTANT: ",
               "<|im_start|>assistant\n", "<start_of_turn>model\n\n"]
    for prompt in prompts:
        delimiter = "" if prompt != prompt.rstrip() else ANSWER_DELIMITER
        for answer in ["red", "top left", "7 cats", "ünïcode"]:
            context, continuation = split_context(prompt, answer)
            ctx_enc, cont_enc = _lm_eval_pair(tok, prompt, delimiter + answer)
            assert tok.encode(context, add_special_tokens=False) == ctx_enc
            assert encode_continuation(tok, context, continuation) == cont_enc


@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen2"])
def test_merge_across_the_boundary_follows_lm_eval(kind, kind_model):
    """When context + continuation merges across the boundary, the continuation is still
    whole[len(context ids):] (lm-eval's rule), scored after the context's own ids."""
    tok = build_tokenizer(kind)
    context, continuation = "What colour is the sha", "pe? Answer: red"
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    assert whole[:len(ctx)] != ctx  # "sha" + "pe" merged into "shape"
    cont = encode_continuation(tok, context, continuation)
    assert cont == _lm_eval_pair(tok, context, continuation)[1] == whole[len(ctx):]
    model = kind_model(kind, tok)  # text only, as lm-eval runs it: context ids + continuation ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    got = score_continuations(model, {"input_ids": torch.tensor([ctx])}, [cont])[0]
    assert got.logprob == pytest.approx(want, abs=1e-5) and got.tokens == len(cont)


def test_boundary_check_counts_from_the_end(tiny_processor):
    """The image expansion changes the prefix's length, not its end; a processor whose encoding
    does not end as the text does is refused."""
    proc = tiny_processor("llava")
    prompt = image_prompt(proc, QUESTION)
    prefix, _ = encode_choices(proc, random_image(), prompt, ["red"])
    text_ids = proc.tokenizer.encode(prompt, add_special_tokens=False)
    assert len(prefix["input_ids"][0]) > len(text_ids) + 10  # 16 image tokens for one placeholder
    assert prefix["input_ids"][0, -6:].tolist() == text_ids[-6:]

    class AppendsEos:
        def __init__(self, inner):
            self.inner, self.tokenizer = inner, inner.tokenizer

        def __call__(self, **kwargs):
            enc = self.inner(**kwargs)
            eos = torch.tensor([[self.tokenizer.eos_token_id]])
            enc["input_ids"] = torch.cat([enc["input_ids"], eos], 1)
            return enc

    with pytest.raises(EvalError, match="would not continue the prompt"):
        encode_choices(AppendsEos(proc), random_image(), prompt, ["red"])


@pytest.mark.parametrize("kind", ["gemma", "llama"])
def test_a_prompt_gets_one_bos_whether_the_template_writes_it_or_not(kind, kind_processor):
    """Gemma's chat template writes <bos> itself; LLaVA-1.5's does not, and the tokenizer adds it."""
    from vlmexp.eval.prompt import image_prompt
    from vlmexp.zoo.tiny_processors import random_image
    from vlmexp.zoo.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(kind, chat_template=True)
    processor = kind_processor(kind, tokenizer)
    prompt = image_prompt(processor, "What colour is the shape?")
    ids = encode_prefix(processor, random_image(), prompt)["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
