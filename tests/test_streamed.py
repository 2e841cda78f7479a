"""Donors read tensor by tensor: the same names, tensors and digests as transformers' loader."""

from __future__ import annotations

import json

import pytest
import torch

from vlmexp import checkpoint
from vlmexp.checkpoint import open_model, save_model, weights_sha256
from vlmexp.merge.engine import MergeEngine
from vlmexp.streamed import open_streamed
from vlmexp.zoo.tiny import build, llava_family, qwen2_vl


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("streamed")
    family = llava_family()
    out = {name: str(save_model(model.to(torch.bfloat16), root / name))
           for name, model in family.items()}
    # sharded, as real checkpoints are: several files and an index
    out["vqa_sharded"] = str(save_model(family["vqa"].to(torch.bfloat16), root / "vqa_sharded",
                                        max_shard_size="40KB"))
    torch.manual_seed(3)
    tied = qwen2_vl(tie_word_embeddings=True).eval()
    out["tied"] = str(save_model(tied, root / "tied"))
    return out


@pytest.mark.parametrize("name", ["base", "vqa", "text", "vqa_sharded", "tied"])
def test_a_streamed_checkpoint_is_what_transformers_loads(folders, name):
    streamed, why = open_streamed(folders[name])
    assert streamed is not None, why
    loaded = open_model(folders[name], load_processor=False).model
    state = loaded.state_dict()
    assert set(streamed.tensors) == set(state)
    for key, tensor in state.items():
        read = streamed.read(key)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), key
    assert streamed.weights_sha256() == weights_sha256(loaded)
    assert {p.device.type for p in streamed.model.parameters()} == {"meta"}


def test_the_sharded_one_really_is_sharded_and_in_legacy_names(folders):
    index = json.loads(open(f"{folders['vqa_sharded']}/model.safetensors.index.json").read())
    assert len(set(index["weight_map"].values())) > 2
    # transformers writes LLaVA under legacy names: streaming maps them back
    assert any(k.startswith("language_model.") or k.startswith("model.language_model.")
               for k in index["weight_map"])


def test_a_checkpoint_transformers_would_cast_is_not_streamed(tmp_path, folders):
    model = build("llava", seed=0)  # float32 tensors
    model.config.dtype = torch.bfloat16  # but the config says bf16: transformers casts on load
    folder = save_model(model, tmp_path / "cast")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))
    streamed, why = open_streamed(folder)
    assert streamed is None and "stored as torch.float32, loads as torch.bfloat16" in why


def test_the_engine_reads_donors_tensor_by_tensor(folders, monkeypatch):
    # from folders, donors are streamed (transformers' loader opens only the base) and give the
    # task vectors, digests and merges of donors opened whole
    whole = MergeEngine(folders["base"],
                        {d: open_model(folders[d], load_processor=False) for d in ("vqa", "text")},
                        progress=False, components={"language", "projector"})
    opened = []
    real = checkpoint.open_model
    monkeypatch.setattr(checkpoint, "open_model",
                        lambda path, **kw: opened.append(str(path)) or real(path, **kw))
    streamed = MergeEngine(folders["base"], {d: folders[d] for d in ("vqa", "text")},
                           progress=False, components={"language", "projector"})
    assert opened == [folders["base"]]
    for d in ("vqa", "text"):
        assert streamed.input_digest(d) == whole.input_digest(d)
        assert set(streamed.task_vectors[d]) == set(whole.task_vectors[d])
        for key, tv in whole.task_vectors[d].items():
            assert tv.dtype == torch.bfloat16  # the model's own dtype
            assert torch.equal(streamed.task_vectors[d][key], tv), key
    assert streamed.sources["vqa"].folder == whole.sources["vqa"].folder


def test_task_vectors_in_slabs_equal_one_pass(folders, monkeypatch):
    # a large tensor's task vector is computed a slab of rows at a time; the bits do not change
    from vlmexp.merge import engine as engine_module

    one = MergeEngine(folders["base"], {"vqa": folders["vqa"]}, progress=False,
                      vector_dtype=torch.float32)
    monkeypatch.setattr(engine_module, "_SLAB_ELEMENTS", 100)
    slabs = MergeEngine(folders["base"], {"vqa": folders["vqa"]}, progress=False,
                        vector_dtype=torch.float32)
    for key, tv in one.task_vectors["vqa"].items():
        assert torch.equal(slabs.task_vectors["vqa"][key], tv), key
    donor = open_model(folders["vqa"], load_processor=False).model.state_dict()
    embed = "model.language_model.embed_tokens.weight"
    expected = donor[embed].float() - one._base[embed].float()
    assert torch.equal(one.task_vectors["vqa"][embed], expected)
