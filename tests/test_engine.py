"""MergeEngine: in-place apply, float64 reference, layouts, caching, determinism, digests, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmexp.errors import MergeError, RecipeError
from vlmexp.merge.engine import MergeEngine
from vlmexp.merge.fingerprint import compare, tolerance_for
from vlmexp.merge.recipe import Recipe
from vlmexp.zoo.tiny import llava_family


@pytest.fixture(scope="module")
def family():
    """A tiny LLaVA base, a fine-tuned relative, and a Llama with the LLaVA's text config."""
    return llava_family()


@pytest.fixture()
def engine(family):
    return MergeEngine(copy.deepcopy(family["base"]),
                       {"vqa": family["vqa"], "text": family["text"]}, progress=False)


def recipe(method: str = "task_arithmetic", **over) -> Recipe:
    data = {"method": method, "base": {"path": "base"},
            "donors": [{"name": "vqa", "path": "vqa"}, {"name": "text", "path": "text"}]}
    data.update(over)
    return Recipe.from_dict(data)


def test_task_arithmetic_matches_float64_reference_with_schedule_and_llm_donor(engine, family):
    r = recipe(components={
        "vision": {"vqa": {"weight": 0.8}},
        "projector": {"vqa": {"weight": 1.2}},
        "language": {"vqa": {"weight": [0.2, 0.6]}, "text": {"weight": 0.5}},
        "head": {"text": {"weight": 1.0}},
    }, parameters={"lambda": 0.9})
    engine.apply(r)
    base = {k: v.double() for k, v in family["base"].state_dict().items()}
    vqa = {k: v.double() for k, v in family["vqa"].state_dict().items()}
    text = {k: v.double() for k, v in family["text"].state_dict().items()}
    live = dict(engine.model.named_parameters())

    def expect(name: str) -> torch.Tensor:
        b = base[name]
        if name.startswith(("model.vision_tower.",)):
            return b + 0.9 * 0.8 * (vqa[name] - b)
        if name.startswith("model.multi_modal_projector."):
            return b + 0.9 * 1.2 * (vqa[name] - b)
        if name.startswith("model.language_model.layers.") or name == "model.language_model.norm.weight":
            # two blocks: block 0 at depth 0, block 1 and the final norm at depth 1
            w = 0.2 if ".layers.0." in name else 0.6
            t = text[name.replace("model.language_model.", "model.")]
            return b + 0.9 * (w * (vqa[name] - b) + 0.5 * (t - b))
        if name == "lm_head.weight":
            return b + 0.9 * (text["lm_head.weight"] - b)
        return b  # embed: not in the recipe

    for name, param in live.items():
        ref = expect(name)
        assert (param.double() - ref).abs().max().item() < 1e-6, name
    # embeddings were left out: the base's exactly
    assert torch.equal(live["model.language_model.embed_tokens.weight"],
                       family["base"].state_dict()["model.language_model.embed_tokens.weight"])


def test_apply_is_in_place_and_left_out_components_return_to_base(engine, family):
    ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    first = engine.apply(recipe(components={"language": {"vqa": {"weight": 1.0}}}))
    assert first.merged > 0
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == ptrs
    second = engine.apply(recipe(components={"vision": {"vqa": {"weight": 1.0}}}))
    base = family["base"].state_dict()
    live = engine.model.state_dict()
    lang = [k for k, i in engine.layout.params.items() if i.component == "language"]
    assert all(torch.equal(live[k], base[k]) for k in lang)
    # written = the vision tensors merged now + the language tensors given back
    vision = [k for k in engine.layout.params if engine.layout.params[k].component == "vision"]
    assert second.merged == len(vision)
    assert second.written == len(vision) + len(lang)


def test_take_copies_a_component_from_a_donor(engine, family):
    engine.apply(recipe(take={"vision": "vqa"}))
    live, vqa, base = (engine.model.state_dict(), family["vqa"].state_dict(),
                       family["base"].state_dict())
    for k in live:
        if k.startswith("model.vision_tower."):
            assert torch.allclose(live[k], vqa[k], atol=1e-7, rtol=0), k
        else:
            assert torch.equal(live[k], base[k]), k


def test_same_recipe_same_digest_and_cached_masks(engine):
    r = recipe("ties", components={"language": {"vqa": {"weight": 1.0, "density": 0.4},
                                                "text": {"weight": 0.7, "density": 0.6}}})
    a = engine.apply(r)
    hits, masks = engine.masks.counts["mask"]
    assert hits == 0 and masks > 0
    b = engine.apply(r)
    assert a.weights_digest == b.weights_digest
    assert engine.masks.counts["mask"] == [masks, masks]  # second apply computed no mask
    other = engine.apply(recipe("ties", components={
        "language": {"vqa": {"weight": 1.0, "density": 0.5}, "text": {"weight": 0.7, "density": 0.6}}}))
    assert other.weights_digest != a.weights_digest


def test_a_new_density_reuses_the_cached_ranking_and_equals_a_top_k_from_scratch(
        engine, family, monkeypatch):
    from vlmexp.merge import methods
    from vlmexp.merge import sparsify as sp

    def comps(density: float) -> dict:
        return {"language": {"vqa": {"weight": 1.0, "density": density},
                             "text": {"weight": 0.7, "density": 0.6}},
                "projector": {"vqa": {"weight": 0.5, "density": density}}}

    first = engine.apply(recipe("ties", components=comps(0.4)))
    hits, ranked = engine.masks.counts["ranking"]
    vqa = [n for n, i in engine.layout.params.items()
           if i.component in ("language", "projector") and n in engine.task_vectors["vqa"]]
    text = [n for n, i in engine.layout.params.items()
            if i.component == "language" and n in engine.task_vectors["text"]]
    assert hits == 0 and ranked == len(vqa) + len(text)
    found = []  # order statistics found from a cached histogram (one bucket, not a top-k)
    kth = sp.MagnitudeHistogram.kth_smallest
    monkeypatch.setattr(sp.MagnitudeHistogram, "kth_smallest",
                        lambda self, mags, k: found.append(k) or kth(self, mags, k))
    searched = engine.apply(recipe("ties", components=comps(0.55)))
    assert len(found) == len(vqa)
    # vqa's new density: one lookup of each tensor's ranking, none computed; text's mask is cached
    assert engine.masks.counts["ranking"] == [len(vqa), ranked]
    assert engine.masks.counts["mask"] == [len(text), 2 * len(vqa) + len(text)]
    assert searched.weights_digest != first.weights_digest
    # the same merge with every mask found by a top-k over the whole tensor (no ranking)
    monkeypatch.setattr(methods, "mask_ranking", lambda method, delta: None)
    scratch = MergeEngine(copy.deepcopy(family["base"]),
                          {"vqa": family["vqa"], "text": family["text"]}, progress=False)
    assert scratch.apply(recipe("ties", components=comps(0.55))).weights_digest == \
        searched.weights_digest
    scratch.apply(recipe("ties", components=comps(0.7)))
    assert scratch.masks.counts["ranking"][0] == 0  # no ranking was kept: all top-k from scratch


def test_dare_masks_depend_on_seed_tensor_donor_and_index_only(family, monkeypatch):
    from vlmexp.merge import sparsify as sp

    def engine_() -> MergeEngine:
        return MergeEngine(copy.deepcopy(family["base"]),
                           {"vqa": family["vqa"], "text": family["text"]}, progress=False)

    both = recipe("dare_ties", seed=4, components={
        "language": {"vqa": {"weight": 1.0, "density": 0.5}, "text": {"weight": 0.6, "density": 0.3}},
        "vision": {"vqa": {"weight": 0.8, "density": 0.7}}})
    a = engine_().apply(both)
    monkeypatch.setattr(sp, "_STREAM_CHUNK_CPU", 97)  # other chunking, another engine
    b = engine_().apply(both)
    assert a.weights_digest == b.weights_digest
    assert a.fingerprints == b.fingerprints
    # vqa's kept entries are the stream's numbers below the density, whoever else takes part
    engine = engine_()
    base = family["base"].state_dict()
    for donors in ({"vqa": {"weight": 1.0, "density": 0.5}},
                   {"vqa": {"weight": 1.0, "density": 0.5}, "text": {"weight": 0.0, "density": 0.2}}):
        engine.apply(recipe("dare_linear", seed=4, components={"language": donors},
                            parameters={"rescale": False}))
        live = engine.model.state_dict()
        checked = 0
        for name, tv in engine.task_vectors["vqa"].items():
            if engine.layout.params[name].component != "language":
                continue
            expected = sp.random_mask(tv, 0.5, sp.CounterStream.of(4, name, "vqa"))
            changed = live[name] != base[name]
            assert torch.equal(changed, expected & (base[name] + tv != base[name])), name
            checked += 1
        assert checked > 5


def test_apply_reports_float64_fingerprints_per_component(engine):
    from vlmexp.merge.fingerprint import Fingerprint, difference

    r = recipe(components={"language": {"vqa": {"weight": 0.6}, "text": {"weight": 0.3}}})
    result = engine.apply(r)
    assert set(result.fingerprints) == {i.component for i in engine.layout.params.values()}
    live = engine.state_dict_view()
    for component, got in result.fingerprints.items():
        tensors = [live[n].double() for n, i in engine.layout.params.items()
                   if i.component == component]
        ref = Fingerprint(total=sum(t.sum().item() for t in tensors),
                          norm=sum((t ** 2).sum().item() for t in tensors) ** 0.5,
                          count=sum(t.numel() for t in tensors))
        assert got.count == ref.count
        assert difference(ref, got) < 1e-7, component  # float32 row sums: 10x below 1e-6
    assert engine.fingerprints() == result.fingerprints
    other = engine.apply(recipe(components={"language": {"vqa": {"weight": 0.7}}}))
    assert other.fingerprints["language"] != result.fingerprints["language"]
    assert other.fingerprints["vision"] == result.fingerprints["vision"]


def test_random_methods_are_seeded_per_tensor(engine):
    comps = {"language": {"vqa": {"weight": 1.0, "density": 0.5}}}
    a = engine.apply(recipe("dare_linear", components=comps, seed=1)).weights_digest
    b = engine.apply(recipe("dare_linear", components=comps, seed=1)).weights_digest
    c = engine.apply(recipe("dare_linear", components=comps, seed=2)).weights_digest
    assert a == b != c


def test_digest_tracks_every_change(engine):
    d0 = engine.weights_digest()
    with torch.no_grad():
        engine.model.model.language_model.norm.weight[3] += 1e-6
    assert engine.weights_digest() != d0
    engine.reset()
    engine._dirty.add("model.language_model.norm.weight")
    engine.reset()
    assert engine.weights_digest() == d0


def test_non_finite_result_names_the_tensor_and_resets(family):
    bad = copy.deepcopy(family["vqa"])
    with torch.no_grad():
        bad.model.multi_modal_projector.linear_2.bias[0] = float("inf")
    engine = MergeEngine(copy.deepcopy(family["base"]), {"vqa": bad}, progress=False)
    before = engine.weights_digest()
    r = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
                          "donors": [{"name": "vqa", "path": "v"}],
                          "components": {"vision": {"vqa": {"weight": 0.5}},
                                         "projector": {"vqa": {"weight": 0.5}}}})
    with pytest.raises(MergeError, match=r"model\.multi_modal_projector\.linear_2\.bias"):
        engine.apply(r)
    assert engine.weights_digest() == before


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "slerp"])
def test_fused_cpu_apply_equals_the_torch_path_bit_for_bit(monkeypatch, family, method):
    # every tensor through the engine's queued weighted sums (one launch per apply), against
    # the per-tensor torch passes
    from vlmexp.merge import kernels

    weight = {"t": 0.3} if method == "slerp" else {"weight": 0.7}
    r = Recipe.from_dict({"method": method, "base": {"path": "b"},
                          "donors": [{"name": "vqa", "path": "v"}],
                          "components": {c: {"vqa": weight}
                                         for c in ("vision", "projector", "language")}})
    engine = MergeEngine(copy.deepcopy(family["base"]), {"vqa": family["vqa"]}, progress=False)
    launches = []
    run = kernels.Queue.run
    monkeypatch.setattr(kernels.Queue, "run",
                        lambda self: launches.append(len(self)) or run(self))
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 1)
    fused = engine.apply(r)
    assert launches == [fused.merged]  # all merged tensors, in one launch
    fused_weights = {k: v.clone() for k, v in engine.state_dict_view().items()}
    monkeypatch.setattr(kernels, "available", lambda *a: False)
    engine.reset()
    torch_path = engine.apply(r)
    assert torch_path.weights_digest == fused.weights_digest
    for k, v in engine.state_dict_view().items():
        assert torch.equal(v, fused_weights[k]), k


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "slerp"])
def test_fused_cpu_merge_checks_finite_in_its_own_pass(monkeypatch, family, method):
    # every tensor through the fused weighted sum: its NaN count is the check, no second read
    from vlmexp.merge import kernels, methods

    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 1)
    bad = copy.deepcopy(family["vqa"])
    with torch.no_grad():
        bad.model.language_model.layers[1].mlp.up_proj.weight[2, 3] = float("nan")
    engine = MergeEngine(copy.deepcopy(family["base"]), {"vqa": bad}, progress=False)
    before = engine.weights_digest()
    weight = {"t": 0.5} if method == "slerp" else {"weight": 0.5}

    def one(comp: str) -> Recipe:
        return Recipe.from_dict({"method": method, "base": {"path": "b"},
                                 "donors": [{"name": "vqa", "path": "v"}],
                                 "components": {comp: {"vqa": weight}}})

    def no_second_read(t):
        raise AssertionError("the fused pass already counted the non-finite values")

    monkeypatch.setattr(methods, "assert_finite", no_second_read)
    assert engine.apply(one("vision")).merged > 0
    count = r"\d+" if method == "slerp" else "1"  # slerp: a NaN angle, so the whole tensor
    with pytest.raises(MergeError, match=r"^merged tensor model\.language_model\.layers\.1\.mlp"
                                         rf"\.up_proj\.weight: {count} merged values are NaN"):
        engine.apply(one("language"))
    assert engine.weights_digest() == before


@pytest.mark.parametrize("queued_mask_bytes", [256 << 20, 1])
def test_fused_ties_apply_is_one_launch_near_the_torch_path(monkeypatch, family,
                                                             queued_mask_bytes):
    # TIES through the engine's queue: one launch per apply (or one per tensor when the queue
    # may hold no masks), NaN counted in the pass, the torch path's weights within float32
    # rounding, and the same weights whichever way the queue is run
    from vlmexp.merge import engine as engine_mod
    from vlmexp.merge import kernels, methods

    r = Recipe.from_dict({"method": "ties", "base": {"path": "b"},
                          "donors": [{"name": "vqa", "path": "v"}, {"name": "text", "path": "t"}],
                          "components": {"language": {"vqa": {"weight": 0.7, "density": 0.5},
                                                      "text": {"weight": 0.6, "density": 0.4}},
                                         "vision": {"vqa": {"weight": 1.0, "density": 0.3}}},
                          "parameters": {"normalize": True}})
    engine = MergeEngine(copy.deepcopy(family["base"]),
                         {"vqa": family["vqa"], "text": family["text"]}, progress=False)
    launches = []
    run = kernels.Queue.run
    monkeypatch.setattr(kernels.Queue, "run",
                        lambda self: launches.append(len(self)) or run(self))
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(engine_mod, "_QUEUED_MASK_BYTES", queued_mask_bytes)

    def no_second_read(t):
        raise AssertionError("the fused pass already counted the non-finite values")

    monkeypatch.setattr(methods, "assert_finite", no_second_read)
    fused = engine.apply(r)
    expected = [fused.merged] if queued_mask_bytes > 1 else [1] * fused.merged
    assert launches == expected
    fused_weights = {k: v.clone() for k, v in engine.state_dict_view().items()}
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "available", lambda *a: False)
    engine.reset()
    engine.apply(r)
    torch_weights = engine.state_dict_view()
    assert max((v - fused_weights[k]).abs().max().item()
               for k, v in torch_weights.items()) <= 1e-6
    base = family["base"].state_dict()
    assert sum(not torch.equal(v, base[k]) for k, v in torch_weights.items()) >= fused.merged // 2


@pytest.mark.parametrize("options", [{}, {"fused": "foreach", "vectors_on": "host",
                                          "pristine_on": "host"}])
def test_deferred_finite_check_of_a_gpu_names_the_tensor_and_resets(family, options):
    # on a GPU the per-tensor sums are read back once at the end; the same path, run here
    # (also as a GPU runs it: multi-tensor sums, inputs copied in from the host)
    bad = copy.deepcopy(family["vqa"])
    with torch.no_grad():
        bad.model.language_model.layers[1].mlp.up_proj.weight[2, 3] = float("nan")
    engine = MergeEngine(copy.deepcopy(family["base"]), {"vqa": bad}, progress=False,
                         **options)
    engine._defer_checks = True
    before = engine.weights_digest()
    ok = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
                           "donors": [{"name": "vqa", "path": "v"}],
                           "components": {"vision": {"vqa": {"weight": 0.5}}}})
    assert engine.apply(ok).merged > 0
    bad_recipe = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
                                   "donors": [{"name": "vqa", "path": "v"}],
                                   "components": {"language": {"vqa": {"weight": 0.5}}}})
    with pytest.raises(MergeError, match=r"layers\.1\.mlp\.up_proj\.weight: 1 merged values"):
        engine.apply(bad_recipe)
    assert engine.weights_digest() == before


@pytest.mark.parametrize("path", ["cpu", "queued", "deferred"])
def test_an_fp16_merge_that_overflows_fp16_names_the_tensor_and_resets(monkeypatch, family,
                                                                       path):
    # the math runs in float32, where 60000 + 60000 is fine; float16 holds at most 65504, so the
    # cast back to the model's dtype makes an inf that must not reach the checkpoint (queued:
    # every tensor through the fused kernels, which write float16 themselves)
    from vlmexp.merge import kernels

    if path == "queued":
        monkeypatch.setattr(kernels, "MIN_ELEMENTS", 1)
    deferred = path == "deferred"
    base = copy.deepcopy(family["base"]).half()
    donors = {}
    for name in ("a", "b"):
        donor = copy.deepcopy(family["base"]).half()
        with torch.no_grad():
            donor.model.multi_modal_projector.linear_2.bias[5] = 60000.0
            donor.model.multi_modal_projector.linear_1.weight.add_(0.01)
        donors[name] = donor
    with torch.no_grad():
        base.model.multi_modal_projector.linear_2.bias[5] = 0.0
    engine = MergeEngine(base, donors, progress=False)
    engine._defer_checks = deferred
    before = engine.weights_digest()
    r = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
                          "donors": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
                          "components": {"projector": {"a": {"weight": 1.0},
                                                       "b": {"weight": 1.0}}}})
    name = r"model\.multi_modal_projector\.linear_2\.bias: 1 merged values"
    detail = r" are NaN or inf" if deferred else (
        r" overflow float16 \(largest magnitude 120000, float16 holds ±65504\)")
    with pytest.raises(MergeError, match=name + detail):
        engine.apply(r)
    assert engine.weights_digest() == before
    half = r.to_dict()
    half["components"]["projector"] = {"a": {"weight": 0.5}, "b": {"weight": 0.5}}
    engine.apply(Recipe.from_dict(half))  # 60000 fits: no error
    assert engine.model.model.multi_modal_projector.linear_2.bias[5].item() == 60000.0
    assert engine.model.model.multi_modal_projector.linear_2.bias.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["task_arithmetic", "slerp", "ties"])
@pytest.mark.parametrize("vectors", ["float32", "model"])
def test_a_bf16_or_fp16_model_merges_in_its_dtype_in_one_launch(monkeypatch, family, dtype,
                                                                 method, vectors):
    # every tensor through the fused kernels, which read the model's dtype (and float32 task
    # vectors, or task vectors stored in the model's dtype) and write it: one launch per
    # apply, the torch path's bits (TIES: its float32 results differ by an ulp at most)
    from vlmexp.merge import kernels

    donors = {"vqa": family["vqa"]} if method == "slerp" else {"vqa": family["vqa"],
                                                               "text": family["text"]}
    engine = MergeEngine(copy.deepcopy(family["base"]).to(dtype),
                         {k: copy.deepcopy(v).to(dtype) for k, v in donors.items()},
                         progress=False,
                         vector_dtype=torch.float32 if vectors == "float32" else None)
    assert {tv.dtype for tvs in engine.task_vectors.values() for tv in tvs.values()} == {
        torch.float32 if vectors == "float32" else dtype}
    weight = ({"t": 0.3} if method == "slerp" else
              {"weight": 0.7, "density": 0.5} if method == "ties" else {"weight": 0.7})
    components = {c: {"vqa": weight} for c in ("vision", "projector", "language")}
    if method != "slerp":
        components["language"]["text"] = {**weight, "weight": 0.4}
    r = Recipe.from_dict({"method": method, "base": {"path": "b"},
                          "donors": [{"name": d, "path": d} for d in donors],
                          "components": components})
    launches, storage = [], set()
    run, weighted_sum, sign_merge = (kernels.Queue.run, kernels.Queue.weighted_sum,
                                     kernels.Queue.sign_merge)
    monkeypatch.setattr(kernels.Queue, "run", lambda self: launches.append(len(self)) or run(self))
    monkeypatch.setattr(kernels.Queue, "weighted_sum", lambda self, out, base, c, deltas, *a: (
        storage.add((out.dtype, base.dtype, deltas[0].dtype))
        or weighted_sum(self, out, base, c, deltas, *a)))
    monkeypatch.setattr(kernels.Queue, "sign_merge", lambda self, out, base, deltas, *a, **k: (
        storage.add((out.dtype, base.dtype, deltas[0].dtype))
        or sign_merge(self, out, base, deltas, *a, **k)))
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 1)
    fused = engine.apply(r)
    assert launches == [fused.merged]
    assert storage == {(dtype, dtype, torch.float32 if vectors == "float32" else dtype)}
    fused_weights = {k: v.clone() for k, v in engine.state_dict_view().items()}
    assert all(v.dtype == dtype for v in fused_weights.values())
    monkeypatch.setattr(kernels, "available", lambda *a: False)
    engine.reset()
    torch_path = engine.apply(r)
    if method != "ties":
        assert torch_path.weights_digest == fused.weights_digest
    changed = 0
    for k, v in engine.state_dict_view().items():
        if method == "ties":
            ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
            assert bool(((v.float() - fused_weights[k].float()).abs()
                         <= ulp * v.float().abs()).all()), k
        else:
            assert torch.equal(v, fused_weights[k]), k
        changed += not torch.equal(v, engine._base[k])
    assert changed >= fused.merged // 2


def test_recipe_naming_an_unloaded_donor_or_wrong_digest_is_refused(engine, family):
    r = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
                          "donors": [{"name": "ocr", "path": "o"}],
                          "components": {"vision": {"ocr": {"weight": 0.5}}}})
    with pytest.raises(RecipeError, match="donor 'ocr' is not loaded"):
        engine.apply(r)
    pinned = engine.pin(recipe())
    engine.check_digests(pinned)
    data = pinned.to_dict()
    data["donors"][0]["weights_sha256"] = "0" * 64
    with pytest.raises(RecipeError, match="vqa .*does not match the loaded weights"):
        engine.check_digests(Recipe.from_dict(data))


def test_take_from_a_donor_without_that_component_is_refused(engine):
    with pytest.raises(RecipeError, match="take.vision: donor 'text' has no tensors aligned "
                                          "with the base's vision"):
        engine.apply(recipe(take={"vision": "text"}))


def test_a_weight_that_cannot_change_the_model_is_refused(engine):
    # the text-only donor reaches the language model, embeddings and head, not the vision tower
    assert set(engine.reach["text"]) == {"language", "embed", "head"}
    assert set(engine.reach["vqa"]) >= {"vision", "projector", "language"}
    with pytest.raises(RecipeError, match=r"components\.vision\.text: donor 'text' has no "
                                          r"tensors aligned with the base's vision"):
        engine.apply(recipe(components={"vision": {"text": {"weight": 0.5}}}))


@pytest.mark.parametrize("method,comps,params", [
    ("linear", {"language": {"vqa": {"weight": 0.6}, "text": {"weight": 0.3}}}, {"base_weight": 0.5}),
    ("slerp", {"vision": {"vqa": {"t": 0.3}}, "language": {"text": {"t": [0.2, 0.8]}}}, {}),
    ("breadcrumbs_ties", {"language": {"vqa": {"weight": 1.0, "density": 0.8, "gamma": 0.05},
                                       "text": {"weight": 0.5, "density": 0.9}}}, {}),
    ("model_stock", {"language": {"vqa": {}, "text": {}}}, {}),
    ("della", {"language": {"vqa": {"weight": 1.0, "density": 0.6},
                            "text": {"weight": 1.0, "density": 0.6}}}, {}),
])
def test_every_family_runs_through_the_engine_and_only_touches_its_components(
        engine, family, method, comps, params):
    result = engine.apply(recipe(method, components=comps, parameters=params))
    live, base = engine.model.state_dict(), family["base"].state_dict()
    touched = {engine.layout.params[n].component for n in engine.layout.params
               if not torch.equal(live[n], base[n])}
    assert touched and touched <= set(comps)
    assert result.merged == sum(1 for n, i in engine.layout.params.items()
                                if i.component in comps
                                and any(n in engine.task_vectors[d] for d in comps[i.component]))


def test_an_engine_for_some_components_keeps_copies_of_those_only(family, engine):
    lean = MergeEngine(copy.deepcopy(family["base"]), {"vqa": family["vqa"], "text": family["text"]},
                       progress=False, components={"language", "embed"})
    kept = {engine.layout.params[n].component for n in lean._base}
    assert kept == {"language", "embed"}
    assert {engine.layout.params[n].component for tv in lean.task_vectors.values() for n in tv} \
        == {"language", "embed"}
    full_bytes = sum(t.nbytes for t in engine._base.values())
    assert sum(t.nbytes for t in lean._base.values()) < 0.8 * full_bytes
    assert lean.input_digest("base") == engine.input_digest("base")  # still the whole base
    r = recipe(components={"language": {"vqa": {"weight": 0.4}, "text": {"weight": 0.7}},
                           "embed": {"text": {"weight": 0.5}}})
    assert lean.apply(r).weights_digest == engine.apply(r).weights_digest
    with pytest.raises(RecipeError, match=r"^components\.vision: this engine keeps base copies "
                                          r"and task vectors only for language, embed$"):
        lean.apply(recipe(components={"vision": {"vqa": {"weight": 0.5}}}))
    lean.reset()
    engine.reset()
    assert lean.weights_digest() == engine.weights_digest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "slerp", "ties"])
def test_the_gpu_engine_path_runs_here_and_agrees_with_the_cpu_kernels(monkeypatch, family,
                                                                       dtype, method):
    # The GPU path (multi-tensor torch ops, deferred finite checks, task vectors and base
    # copies on the host, copied in per tensor) run on the CPU: weighted sums in a few grouped
    # launches per apply, the CPU kernels' result within an ulp of the dtype per donor term
    from vlmexp.merge import kernels

    donors = {"vqa": family["vqa"], "text": family["text"]}
    base = copy.deepcopy(family["base"]).to(dtype)
    cpu = MergeEngine(copy.deepcopy(base), {k: copy.deepcopy(v).to(dtype)
                                            for k, v in donors.items()}, progress=False)
    gpu_like = MergeEngine(base, {k: copy.deepcopy(v).to(dtype) for k, v in donors.items()},
                           progress=False, fused="foreach", vectors_on="host",
                           pristine_on="host")
    gpu_like._defer_checks = True
    weight = ({"t": 0.3} if method == "slerp" else
              {"weight": 0.7, "density": 0.5} if method == "ties" else {"weight": 0.7})
    components = {c: {"vqa": weight} for c in ("vision", "projector", "language")}
    if method != "slerp":
        components["language"]["text"] = {**weight, "weight": [0.2, 0.9]}  # a depth schedule
    r = Recipe.from_dict({"method": method, "base": {"path": "b"},
                          "donors": [{"name": d, "path": d} for d in
                                     (["vqa"] if method == "slerp" else donors)],
                          "components": components})
    runs, groups = [], []
    run = kernels.ForeachQueue.run
    add = torch._foreach_add_
    monkeypatch.setattr(kernels.ForeachQueue, "run",
                        lambda self: runs.append(len(self)) or run(self))
    monkeypatch.setattr(torch, "_foreach_add_", lambda outs, *a, **k: (
        groups.append(len(outs)) or add(outs, *a, **k)))
    result = gpu_like.apply(r)
    expected = cpu.apply(r)
    if method == "ties":  # sign merges take the chunked torch path there
        assert runs == []
    else:
        assert runs == [result.merged]  # every merged tensor queued, run once
        assert len(groups) < result.merged  # grouped launches, not one per tensor
        # float32 math rounded once, as the CPU kernels: here, the same bits
        assert result.weights_digest == expected.weights_digest
    ulp = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -6}[dtype]
    for name, value in gpu_like.state_dict_view().items():
        other = cpu.state_dict_view()[name]
        assert value.dtype == dtype
        gap = (value.double() - other.double()).abs()
        # a narrow dtype rounds after each donor's term (of values up to base + Σ|δ| in size)
        scale = other.double().abs() + cpu._base.get(name, other).double().abs() + sum(
            tvs[name].double().abs() for tvs in cpu.task_vectors.values() if name in tvs)
        assert (gap <= ulp * scale + 1e-30).all(), name
    # what `reproduce` on another device checks: fingerprints within the dtype's tolerance
    check = compare(expected.fingerprints, result.fingerprints, tolerance=tolerance_for([dtype]))
    assert check.agree, check.why
    cpu.reset()
    gpu_like.reset()  # base copies from the host
    assert gpu_like.weights_digest() == cpu.weights_digest()
