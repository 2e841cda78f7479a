"""vlmexp.checkpoint: open both key layouts, atomic save, digests, one-line errors on bad input."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmexp.checkpoint import (
    LoadedModel,
    auto_model_class,
    folder_weights_sha256,
    load_processor,
    open_model,
    resolve_device,
    save_model,
    weights_sha256,
)
from vlmexp.errors import CheckpointError
from vlmexp.zoo.tiny import LLMS

# Layout pairs that must open identically; llava_next and qwen2_5_vl ride along cheaply.
ARCHS = ("llava", "qwen2_vl", "paligemma", "gemma3", "idefics3", "llava_next", "qwen2_5_vl", *LLMS)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = _state(expected), _state(actual)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def _file_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    return keys


def _one_line_error(excinfo: pytest.ExceptionInfo[CheckpointError]) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """`saved(name, layout)`: a folder written by transformers' own save_pretrained ("legacy"
    is its default, "native" uses save_original_format=False)."""
    root = tmp_path_factory.mktemp("layouts")

    def get(name: str, layout: str) -> Path:
        folder = root / f"{name}-{layout}"
        if not folder.exists():
            tiny(name).save_pretrained(folder, save_original_format=layout == "legacy")
        return folder

    return get


@pytest.fixture(scope="module")
def llava_processor():
    """A LlavaProcessor built offline: a word-level tokenizer, a 32-pixel CLIP image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "a", "cat", "dog", "what", "is", "this"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = tf.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return tf.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="full",
    )


@pytest.fixture
def llava_dir(tiny, tmp_path) -> Path:
    """A fresh native-layout LLaVA folder that a test may corrupt."""
    folder = tmp_path / "llava"
    tiny("llava").save_pretrained(folder, save_original_format=False)
    return folder


@pytest.fixture
def sharded_dir(tiny, tmp_path) -> Path:
    """A fresh LLaVA folder in several shards with an index."""
    folder = tmp_path / "sharded"
    tiny("llava").save_pretrained(folder, max_shard_size="20KB")
    return folder


# --- opening both layouts ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_legacy_and_native_layouts_open_to_the_same_names_and_tensors(tiny, saved, name):
    legacy, native = saved(name, "legacy"), saved(name, "native")
    if name not in ("idefics3", *LLMS):  # these classes have no legacy renaming
        assert _file_keys(legacy) != _file_keys(native)
    for folder in (legacy, native):
        loaded = open_model(folder)
        assert isinstance(loaded, LoadedModel)
        assert type(loaded.model) is type(tiny(name))
        assert not loaded.model.training
        assert loaded.config is loaded.model.config
        assert loaded.path == str(folder)
        assert loaded.processor is None  # no processor files were written
        _assert_same_weights(tiny(name), loaded.model)


@pytest.mark.parametrize("name", ["llava", "gemma3", "gemma3_text"])
def test_digest_is_layout_independent_and_matches_the_live_model(tiny, saved, name):
    digest = weights_sha256(tiny(name))
    assert folder_weights_sha256(saved(name, "legacy")) == digest
    assert folder_weights_sha256(saved(name, "native")) == digest


def test_auto_class_follows_the_config(tiny, saved):
    assert isinstance(open_model(saved("gemma3", "native")).model,
                      tf.Gemma3ForConditionalGeneration)
    assert isinstance(open_model(saved("gemma3_text", "native")).model, tf.Gemma3ForCausalLM)
    assert isinstance(open_model(saved("llama", "native")).model, tf.LlamaForCausalLM)
    assert auto_model_class(tiny("llava").config) is tf.AutoModelForImageTextToText
    assert auto_model_class(tiny("qwen2").config) is tf.AutoModelForCausalLM


def test_tied_embeddings_stay_tied_after_open(saved):
    model = open_model(saved("gemma3", "legacy")).model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_dtype_defaults_to_the_checkpoint_and_can_be_overridden(tiny, tmp_path):
    bf16 = copy.deepcopy(tiny("llama")).to(torch.bfloat16)
    folder = save_model(bf16, tmp_path / "bf16")
    assert open_model(folder).model.dtype == torch.bfloat16
    as_f32 = open_model(folder, dtype=torch.float32).model
    assert as_f32.dtype == torch.float32
    assert torch.equal(as_f32.lm_head.weight, bf16.lm_head.weight.float())


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == "cpu"
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == "cuda"
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


# --- saving -----------------------------------------------------------------------------------


@pytest.mark.parametrize("native_layout", [False, True])
def test_save_model_writes_the_requested_layout_and_reloads_with_auto_classes(
    tiny, saved, tmp_path, native_layout
):
    out = save_model(tiny("llava"), tmp_path / "out", native_layout=native_layout)
    assert out == tmp_path / "out"
    reference = saved("llava", "native" if native_layout else "legacy")
    assert _file_keys(out) == _file_keys(reference)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                               "generation_config.json"}
    model = tf.AutoModelForImageTextToText.from_pretrained(out)
    _assert_same_weights(tiny("llava"), model)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_save_model_shards_by_size(tiny, tmp_path):
    out = save_model(tiny("qwen2"), tmp_path / "out", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    _assert_same_weights(tiny("qwen2"), tf.AutoModelForCausalLM.from_pretrained(out))
    _assert_same_weights(tiny("qwen2"), open_model(out).model)


def test_save_model_with_processor_round_trips(tiny, tmp_path, llava_processor):
    source = tmp_path / "source"
    source.mkdir()
    (source / "README.md").write_text("card\n")  # a source without processor files: it is saved
    out = save_model(tiny("llava"), tmp_path / "out", processor=llava_processor, source_dir=source)
    assert (out / "README.md").read_text() == "card\n"
    # a source with processor files: they are the merge's, byte for byte, not the processor's
    (source / "tokenizer_config.json").write_text('{"note": "the base\'s own"}')
    again = save_model(tiny("llava"), tmp_path / "again", processor=llava_processor,
                       source_dir=source)
    assert (again / "tokenizer_config.json").read_text() == '{"note": "the base\'s own"}'
    assert not (again / "processor_config.json").exists()
    processor = tf.AutoProcessor.from_pretrained(out)
    assert isinstance(processor, tf.LlavaProcessor)
    loaded = open_model(out)
    assert isinstance(loaded.processor, tf.LlavaProcessor)
    assert loaded.processor.tokenizer("what is this")["input_ids"] == [8, 9, 10]
    assert isinstance(load_processor(out), tf.LlavaProcessor)


def test_save_model_copies_non_weight_files_from_source(tiny, tmp_path, llava_processor):
    source = save_model(tiny("llava"), tmp_path / "source", processor=llava_processor)
    (source / "README.md").write_text("base model card\n")
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "stale.safetensors").write_bytes(b"not copied")
    merged = copy.deepcopy(tiny("llava"))
    with torch.no_grad():
        merged.lm_head.weight.add_(1.0)
    out = save_model(merged, tmp_path / "out", source_dir=source)
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "README.md",
            "chat_template.jinja"} <= names
    assert "stale.safetensors" not in names
    assert (out / "README.md").read_text() == "base model card\n"
    loaded = open_model(out)
    _assert_same_weights(merged, loaded.model)  # the new weights, not the source's
    assert isinstance(loaded.processor, tf.LlavaProcessor)
    assert tf.AutoTokenizer.from_pretrained(out)("a cat")["input_ids"] == [5, 6]


def test_save_model_refuses_an_existing_folder_unless_forced(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError) as excinfo:
        save_model(tiny("llama"), out)
    assert str(out) in _one_line_error(excinfo) and "force" in str(excinfo.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save_model(tiny("llama"), out, force=True)
    assert not (out / "keep.txt").exists()
    _assert_same_weights(tiny("llama"), open_model(out).model)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


class _FailingProcessor:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{")  # half written
        raise RuntimeError("disk full")


def test_a_failure_mid_write_leaves_nothing_at_out_dir(tiny, tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tiny("llama"), tmp_path / "out", processor=_FailingProcessor())
    assert list(tmp_path.iterdir()) == []


def test_a_failure_mid_write_with_force_keeps_the_old_folder(tiny, tmp_path):
    out = save_model(tiny("llama"), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tiny("qwen2"), out, processor=_FailingProcessor(), force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- digests ----------------------------------------------------------------------------------


def test_digest_format_is_name_dtype_shape_bytes_in_sorted_order():
    a = torch.arange(3, dtype=torch.float32)
    b = torch.tensor([[1, 2]], dtype=torch.int64)
    expected = hashlib.sha256()
    expected.update(b"a\0float32\0(3,)\0" + a.numpy().tobytes())
    expected.update(b"b\0int64\0(1, 2)\0" + b.numpy().tobytes())
    assert weights_sha256({"b": b, "a": a}) == expected.hexdigest()


def test_digest_changes_with_one_element_name_dtype_or_shape():
    state = {"x": torch.randn(4, 3), "y": torch.randn(5)}
    digest = weights_sha256(state)
    assert weights_sha256({k: v.clone() for k, v in reversed(state.items())}) == digest
    changed = {k: v.clone() for k, v in state.items()}
    changed["y"][2] = torch.nextafter(changed["y"][2], torch.tensor(float("inf")))
    assert weights_sha256(changed) != digest
    assert weights_sha256({"x": state["x"], "z": state["y"]}) != digest
    assert weights_sha256({"x": state["x"].reshape(3, 4), "y": state["y"]}) != digest
    assert weights_sha256({"x": state["x"].double(), "y": state["y"]}) != digest


def test_digest_counts_tied_tensors_once_but_not_equal_copies():
    t = torch.randn(6)
    assert weights_sha256({"a": t, "b": t}) == weights_sha256({"a": t})
    assert weights_sha256({"a": t, "b": t.clone()}) != weights_sha256({"a": t})
    # Two views of one storage are different tensors, not a tie.
    base = torch.randn(4, 3)
    assert weights_sha256({"a": base[:2], "b": base[2:]}) != weights_sha256({"a": base[:2]})


def test_digest_handles_bf16_and_non_contiguous_tensors():
    t = torch.randn(3, 4)
    assert weights_sha256({"w": t.t()}) == weights_sha256({"w": t.t().contiguous()})
    bf = t.to(torch.bfloat16)
    assert weights_sha256({"w": bf}) == weights_sha256({"w": bf.clone()})
    assert weights_sha256({"w": bf}) != weights_sha256({"w": bf.float()})
    expected = hashlib.sha256(b"w\0bfloat16\0(3, 4)\0" + bf.view(torch.int16).numpy().tobytes())
    assert weights_sha256({"w": bf}) == expected.hexdigest()


def test_digest_of_a_model_equals_digest_of_its_state_dict(tiny):
    model = tiny("gemma3_text")
    assert weights_sha256(model) == weights_sha256(model.state_dict())


# --- bad input: one line, naming the file at fault --------------------------------------------


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as excinfo:
        open_model(tmp_path)
    assert "no config.json" in _one_line_error(excinfo) and str(tmp_path) in str(excinfo.value)


def test_a_file_is_not_a_model_folder(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError) as excinfo:
        open_model(path)
    assert str(path) in _one_line_error(excinfo)


def test_missing_folder_offline_names_it(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        open_model("some-org/not-a-local-folder")
    text = _one_line_error(excinfo)
    assert "some-org/not-a-local-folder" in text and "offline" in text
    with pytest.raises(CheckpointError, match="no such model folder"):
        open_model(tmp_path / "nope")


def test_folder_without_weights(llava_dir):
    (llava_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as excinfo:
        open_model(llava_dir)
    assert "no weights" in _one_line_error(excinfo)


def test_truncated_single_file(llava_dir):
    weights = llava_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as excinfo:
        open_model(llava_dir)
    assert str(weights) in _one_line_error(excinfo) and "truncated" in str(excinfo.value)


def test_garbage_header(llava_dir):
    weights = llava_dir / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError) as excinfo:
        open_model(llava_dir)
    assert str(weights) in _one_line_error(excinfo) and "corrupt" in str(excinfo.value)


def test_truncated_shard_is_named(sharded_dir):
    shards = sorted(sharded_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    victim = shards[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError) as excinfo:
        open_model(sharded_dir)
    text = _one_line_error(excinfo)
    assert str(victim) in text and all(str(s) not in text for s in shards if s != victim)


def test_index_naming_a_missing_shard_names_both(sharded_dir):
    shards = sorted(sharded_dir.glob("model-*.safetensors"))
    shards[0].unlink()
    with pytest.raises(CheckpointError) as excinfo:
        open_model(sharded_dir)
    text = _one_line_error(excinfo)
    assert "model.safetensors.index.json" in text and shards[0].name in text


def test_index_edited_to_an_unknown_shard(sharded_dir):
    index_file = sharded_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "model-99999-of-99999.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as excinfo:
        open_model(sharded_dir)
    text = _one_line_error(excinfo)
    assert "model.safetensors.index.json" in text and "model-99999-of-99999.safetensors" in text


def test_index_mapping_a_key_to_the_wrong_shard(sharded_dir):
    index_file = sharded_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    by_shard: dict[str, list[str]] = {}
    for key, shard in index["weight_map"].items():
        by_shard.setdefault(shard, []).append(key)
    first, second = sorted(by_shard)[:2]
    key = by_shard[first][0]
    index["weight_map"][key] = second
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as excinfo:
        open_model(sharded_dir)
    assert key in _one_line_error(excinfo) and second in str(excinfo.value)


def test_shards_without_index(sharded_dir):
    (sharded_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError) as excinfo:
        open_model(sharded_dir)
    assert "model.safetensors.index.json" in _one_line_error(excinfo)


def test_pickle_only_checkpoint_needs_opt_in(tiny, llava_dir):
    (llava_dir / "model.safetensors").unlink()
    model = tiny("llava")
    torch.save(model.state_dict(), llava_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as excinfo:
        open_model(llava_dir)
    text = _one_line_error(excinfo)
    assert "pytorch_model.bin" in text and "allow_pickle=True" in text
    _assert_same_weights(model, open_model(llava_dir, allow_pickle=True).model)


def test_safetensors_preferred_over_pickle(tiny, llava_dir):
    (llava_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
    _assert_same_weights(tiny("llava"), open_model(llava_dir).model)


def test_unknown_architecture_suggests_trust_remote_code(llava_dir):
    config_file = llava_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = "my_private_vlm"
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as excinfo:
        open_model(llava_dir)
    text = _one_line_error(excinfo)
    assert str(config_file) in text and "my_private_vlm" in text
    assert "trust_remote_code=True" in text and "--trust-remote-code" in text


def test_a_model_that_is_neither_image_text_nor_causal_lm(tmp_path):
    vision = tf.CLIPVisionModel(tf.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    ))
    vision.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        open_model(tmp_path)
    text = _one_line_error(excinfo)
    assert str(tmp_path / "config.json") in text and "CLIPVisionModel" in text


def test_config_that_is_not_json(llava_dir):
    (llava_dir / "config.json").write_text("{model_type: llava")
    with pytest.raises(CheckpointError) as excinfo:
        open_model(llava_dir)
    assert "config.json" in _one_line_error(excinfo)


def _rewrite_weights(folder: Path, edit) -> None:
    weights = folder / "model.safetensors"
    state = load_file(weights)
    edit(state)
    save_file(state, weights, metadata={"format": "pt"})


def test_a_missing_tensor_is_an_error_not_a_random_init(llava_dir):
    _rewrite_weights(llava_dir, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError) as excinfo:
        open_model(llava_dir)
    text = _one_line_error(excinfo)
    assert str(llava_dir / "model.safetensors") in text
    assert "missing keys" in text and "lm_head.weight" in text


def test_an_unexpected_tensor_is_an_error(llava_dir):
    _rewrite_weights(llava_dir, lambda s: s.update(stray=torch.zeros(2)))
    with pytest.raises(CheckpointError) as excinfo:
        open_model(llava_dir)
    text = _one_line_error(excinfo)
    assert "unexpected keys" in text and "stray" in text


def test_a_mis_shaped_tensor_is_an_error(llava_dir):
    _rewrite_weights(llava_dir, lambda s: s.update({"lm_head.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError) as excinfo:
        open_model(llava_dir)
    assert "lm_head.weight" in _one_line_error(excinfo)


def test_load_processor_is_none_without_processor_files(saved):
    assert load_processor(saved("llava", "native")) is None


def test_load_processor_falls_back_to_the_tokenizer(tmp_path, llava_processor):
    llava_processor.tokenizer.save_pretrained(tmp_path)
    tokenizer = load_processor(tmp_path)
    assert isinstance(tokenizer, tf.PreTrainedTokenizerBase)
    assert tokenizer("a dog")["input_ids"] == [5, 7]


def test_copy_skips_only_weight_files(tiny, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", "config.json"):
        (source / name).write_text("{}")
    out = save_model(tiny("llama"), tmp_path / "out", source_dir=source)
    names = {p.name for p in out.iterdir()}
    assert {"vocab.json", "merges.txt", "special_tokens_map.json"} <= names
    assert "pytorch_model.bin" not in names and "model.safetensors.index.json" not in names
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    shutil.rmtree(source)
