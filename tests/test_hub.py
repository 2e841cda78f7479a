"""Hub ids offline: a Hugging Face cache laid out by `vlmexp.zoo.hub`, resolved by
`checkpoint.resolve_model`, opened, merged, exported and inspected through it; sharded bf16
checkpoints and tied embeddings as they come."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from vlmexp.checkpoint import (
    hub_cache_dir,
    load_processor,
    open_model,
    resolve_model,
    save_model,
)
from vlmexp.cli import main
from vlmexp.errors import CheckpointError
from vlmexp.merge.engine import MergeEngine
from vlmexp.merge.recipe import Recipe
from vlmexp.zoo.hub import lay_out_hub_cache
from vlmexp.zoo.tiny import build, perturb, qwen2_vl

NON_WEIGHT = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "README.md")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_processor) -> dict[str, Path]:
    """A bf16 tiny LLaVA base and a fine-tuned relative, each in several safetensors shards
    (native layout, so that export takes them) with the LLaVA processor and a model card."""
    root = tmp_path_factory.mktemp("hub_models")
    out = {}
    for name, seed in (("base", 0), ("vqa", 1)):
        model = build("llava", seed=0)
        if seed:
            perturb(model, seed, scale=0.05)
        out[name] = save_model(model.to(torch.bfloat16), root / name,
                               processor=tiny_processor("llava"), max_shard_size="20KB",
                               native_layout=True)
        (out[name] / "README.md").write_text(f"{name} card\n")
    return out


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache of this test (HF_HOME and HF_HUB_CACHE point here), offline."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


def _snapshot(hub: Path, repo_id: str, commit: str) -> Path:
    return hub / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def _one_line(text: str) -> str:
    text = text.strip()
    assert text and "\n" not in text
    return text


def _error_line(stderr: str) -> str:
    """The CLI's error: one line, printed once (progress bars may come before it)."""
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if ": error: " in line]
    assert len(errors) == 1, stderr
    return errors[0]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _write_recipe(path: Path, base: str, donor: str, **extra) -> Path:
    data = {"vlmexp_recipe": 1, "method": "task_arithmetic", "base": {"path": base},
            "donors": [{"name": "vqa", "path": donor}],
            "components": {"language": {"vqa": {"weight": [0.2, 0.9]}},
                           "projector": {"vqa": {"weight": 0.6}},
                           "vision": {"vqa": {"weight": 0.5}}}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


# --- the cache and the resolver -----------------------------------------------------------------


def test_the_laid_out_cache_is_what_huggingface_hub_reads(hub, folders):
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

    commit = lay_out_hub_cache(hub, "org/base", folders["base"])
    assert lay_out_hub_cache(hub, "org/base", folders["base"]) == commit  # same files, same id
    assert lay_out_hub_cache(hub, "org/vqa", folders["vqa"]) != commit
    assert hub_cache_dir() == hub
    repos = {r.repo_id: r for r in scan_cache_dir(hub).repos}
    assert set(repos) == {"org/base", "org/vqa"}
    assert [r.commit_hash for r in repos["org/base"].revisions] == [commit]
    assert repos["org/base"].refs["main"].commit_hash == commit
    cached = Path(try_to_load_from_cache("org/base", "config.json", cache_dir=hub))
    assert cached == _snapshot(hub, "org/base", commit) / "config.json"
    assert cached.is_symlink() and (hub / "models--org--base" / "blobs") in cached.resolve().parents
    assert cached.read_bytes() == (folders["base"] / "config.json").read_bytes()
    found = snapshot_download("org/base", cache_dir=hub, local_files_only=True)
    assert Path(found) == _snapshot(hub, "org/base", commit)


def test_resolve_model_finds_folders_and_cached_hub_ids_offline(hub, folders, tmp_path):
    local = resolve_model(folders["base"])
    assert local.folder == folders["base"] and local.revision is None
    assert local.pinned == str(folders["base"])
    commit = lay_out_hub_cache(hub, "org/base", folders["base"])
    for spec in ("org/base", "org/base@main", f"org/base@{commit}"):
        resolved = resolve_model(spec)
        assert resolved.folder == _snapshot(hub, "org/base", commit), spec
        assert resolved.revision == commit and resolved.spec == spec
        assert resolved.pinned == f"org/base@{commit}"
    # main moves on: the name follows it, a recorded commit keeps the old snapshot
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for f in folders["vqa"].iterdir():
        if f.name.startswith(("model", "config")):
            (weights_only / f.name).write_bytes(f.read_bytes())
    newer = lay_out_hub_cache(hub, "org/base", weights_only)
    assert resolve_model("org/base").revision == newer
    assert resolve_model("org/base", commit).folder == _snapshot(hub, "org/base", commit)
    assert resolve_model("org/base@main", commit).revision == commit
    assert load_processor("org/base") is None  # the newer snapshot has no processor files
    assert isinstance(load_processor("org/base", commit), tf.LlavaProcessor)


@pytest.mark.parametrize("spec, says", [
    ("org/base@" + "f" * 40, "revision ffffffffffffffffffffffffffffffffffffffff of org/base"),
    ("org/base@dev", "revision dev of org/base"),
    ("org/missing", "org/missing is not in the Hugging Face cache"),
])
def test_a_hub_id_not_in_the_cache_is_one_line_naming_the_cache(hub, folders, spec, says):
    commit = lay_out_hub_cache(hub, "org/base", folders["base"])
    with pytest.raises(CheckpointError) as excinfo:
        resolve_model(spec)
    text = _one_line(str(excinfo.value))
    assert text.startswith(f"{spec}: ") and says in text
    assert "not in the Hugging Face cache" in text and f"({hub}" in text and "offline" in text
    if "revision" in says:
        assert commit[:12] in text  # what the cache does hold


def test_a_recorded_revision_must_agree_with_a_commit_in_the_name(hub, folders):
    commit = lay_out_hub_cache(hub, "org/base", folders["base"])
    with pytest.raises(CheckpointError, match="names commit"):
        resolve_model(f"org/base@{commit}", "a" * 40)
    with pytest.raises(CheckpointError, match="not a hub id"):
        resolve_model(str(folders["base"]), commit)


# --- opening and saving checkpoints as they come ----------------------------------------------


def test_a_sharded_bf16_llava_opens_by_hub_id_and_saves_sharded_in_bf16(hub, folders, tmp_path):
    index = json.loads((folders["base"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    commit = lay_out_hub_cache(hub, "org/base", folders["base"])
    loaded = open_model("org/base")
    assert loaded.path == "org/base" and loaded.source.revision == commit
    assert isinstance(loaded.processor, tf.LlavaProcessor)
    expected = _weights(open_model(folders["base"], load_processor=False).model)
    got = _weights(loaded.model)
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    out = save_model(loaded.model, tmp_path / "out", processor=loaded.processor,
                     source_dir=loaded.source, max_shard_size="20KB")
    written = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(written["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "README.md").read_text() == "base card\n"
    assert not any(p.is_symlink() for p in out.iterdir())  # copies, not links into the cache
    reloaded = tf.AutoModelForImageTextToText.from_pretrained(out)
    again = _weights(reloaded)
    assert {v.dtype for v in again.values()} == {torch.bfloat16}
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_a_tied_qwen2_vl_round_trips_through_the_hub_and_a_merge(hub, tmp_path, tiny_processor):
    torch.manual_seed(0)
    base = qwen2_vl(tie_word_embeddings=True).eval().to(torch.bfloat16)
    ft = perturb(copy.deepcopy(base), 3, scale=0.05)
    for name, model in (("qwen-base", base), ("qwen-ft", ft)):
        save_model(model, tmp_path / name, processor=tiny_processor("qwen2_vl"))
        lay_out_hub_cache(hub, f"org/{name}", tmp_path / name)
    loaded = open_model("org/qwen-base").model
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert torch.equal(loaded.lm_head.weight, base.lm_head.weight)
    recipe = tmp_path / "r.yaml"

    def write(components: tuple[str, ...]) -> None:
        recipe.write_text(yaml.safe_dump({
            "method": "task_arithmetic", "base": "org/qwen-base",
            "donors": [{"name": "ft", "path": "org/qwen-ft"}],
            "components": {c: {"ft": {"weight": 0.5}} for c in components}}))

    # the head is the embeddings here: a head weight could change nothing, and is refused
    write(("embed", "head", "language"))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "merged")]) == 2
    assert not (tmp_path / "merged").exists()
    write(("embed", "language"))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "merged")]) == 0
    merged = tf.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    embed = merged.get_input_embeddings().weight
    assert merged.lm_head.weight.data_ptr() == embed.data_ptr()  # still tied on reload
    assert embed.dtype == torch.bfloat16
    halfway = (base.lm_head.weight.float() + ft.lm_head.weight.float()) / 2
    assert torch.allclose(embed.float(), halfway, atol=1e-2)
    assert not torch.equal(embed, base.lm_head.weight)
    written = Recipe.from_yaml(tmp_path / "merged" / "recipe.yaml")
    assert written.base.revision == resolve_model("org/qwen-base").revision


# --- commands ------------------------------------------------------------------------------------


def test_inspect_opens_a_hub_id_offline(hub, folders, capsys):
    lay_out_hub_cache(hub, "org/base", folders["base"])
    assert main(["inspect", str(folders["base"]), "--json"]) == 0
    from_folder = json.loads(capsys.readouterr().out)["models"][0]
    assert main(["inspect", "org/base", "--json"]) == 0
    from_hub = json.loads(capsys.readouterr().out)["models"][0]
    assert from_hub.pop("model") == "org/base"
    from_folder.pop("model")
    assert from_hub == from_folder
    assert {p["dtype"] for p in from_hub["params"].values()} == {"bfloat16"}
    assert main(["inspect", "org/base@" + "e" * 40]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "not in the Hugging Face cache" in err and str(hub) in err


def test_merge_of_hub_ids_writes_a_complete_bf16_checkpoint_pinned_to_the_commits(
        hub, folders, tmp_path, capsys):
    base_commit = lay_out_hub_cache(hub, "org/base", folders["base"])
    vqa_commit = lay_out_hub_cache(hub, "org/vqa", folders["vqa"])
    recipe_path = _write_recipe(tmp_path / "r.yaml", "org/base", "org/vqa@main")
    out = tmp_path / "merged"
    assert main(["merge", str(recipe_path), "--out", str(out)]) == 0
    # the base's non-weight files come from its snapshot, as files
    for name in NON_WEIGHT:
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert (out / "README.md").read_text() == "base card\n"
    assert tf.AutoProcessor.from_pretrained(out).tokenizer("red")["input_ids"] == (
        tf.AutoProcessor.from_pretrained(folders["base"]).tokenizer("red")["input_ids"])
    # bf16 in, bf16 out, loadable with the Auto classes, equal to the engine's merge
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = _weights(tf.AutoModelForImageTextToText.from_pretrained(out))
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    recipe = Recipe.from_yaml(recipe_path)
    engine = MergeEngine.from_recipe(recipe, progress=False)
    engine.apply(recipe)
    ours = engine.state_dict_view()
    assert all(torch.equal(ours[k], merged[k]) for k in ours)
    base = _weights(open_model(folders["base"], load_processor=False).model)
    assert sum(not torch.equal(merged[k], base[k]) for k in base) > 20
    # the written recipe records the commits, and rebuilds from them after main moved on
    written = Recipe.from_yaml(out / "recipe.yaml")
    assert (written.base.path, written.base.revision) == ("org/base", base_commit)
    assert (written.donors[0].path, written.donors[0].revision) == ("org/vqa@main", vqa_commit)
    assert f"revision: {base_commit}" in (out / "recipe.yaml").read_text()
    lay_out_hub_cache(hub, "org/base", folders["vqa"])  # org/base's main now holds other weights
    assert resolve_model("org/base").revision != base_commit
    again = tmp_path / "again"
    assert main(["merge", str(out / "recipe.yaml"), "--out", str(again)]) == 0
    rebuilt = _weights(tf.AutoModelForImageTextToText.from_pretrained(again))
    assert all(torch.equal(rebuilt[k], merged[k]) for k in merged)
    assert (again / "README.md").read_text() == "base card\n"  # the recorded snapshot's files
    # without the record, org/base is the new main, and the pinned digest refuses it
    unpinned = written.to_dict()
    unpinned["base"].pop("revision")
    (tmp_path / "unpinned.yaml").write_text(yaml.safe_dump(unpinned))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "unpinned.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "weights_sha256" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_merge_of_a_hub_id_not_in_the_cache_writes_nothing(hub, folders, tmp_path, capsys):
    lay_out_hub_cache(hub, "org/base", folders["base"])
    recipe_path = _write_recipe(tmp_path / "r.yaml", "org/base", "org/not-cached")
    assert main(["merge", str(recipe_path), "--out", str(tmp_path / "out")]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "org/not-cached" in err and "not in the Hugging Face cache" in err and str(hub) in err
    assert not (tmp_path / "out").exists()


def test_export_writes_hub_ids_at_their_commits(hub, folders, tmp_path):
    base_commit = lay_out_hub_cache(hub, "org/base", folders["base"])
    vqa_commit = lay_out_hub_cache(hub, "org/vqa", folders["vqa"])
    recipe_path = _write_recipe(tmp_path / "r.yaml", "org/base", "org/vqa")
    assert main(["export", str(recipe_path), "--out", str(tmp_path / "mk.yaml")]) == 0
    config = yaml.safe_load((tmp_path / "mk.yaml").read_text())
    assert config["base_model"] == f"org/base@{base_commit}"
    assert [m["model"] for m in config["models"]] == [f"org/vqa@{vqa_commit}"]
    assert config["out_dtype"] == "bfloat16"
