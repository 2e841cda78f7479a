"""Real checkpoints by hub id, offline: stand-ins of LLaVA-1.5, Qwen2-VL-2B-Instruct and Gemma 3
(tiny models of the real architectures, tokenizers of the real kinds with the real chat
templates, bf16, sharded; `vlmexp.zoo.standins`) laid out in a Hugging Face cache under the real
hub ids. Every command must show a model the same prompts and give it the same scores, and the
README's "Bring your own checkpoints" commands run verbatim."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import mlflow
import pytest
import torch
import transformers as tf
import yaml

from vlmexp.checkpoint import load_processor, resolve_model
from vlmexp.cli import main
from vlmexp.zoo.standins import FAMILIES, lay_out_family

README = Path(__file__).resolve().parents[1] / "README.md"
IMAGE_TASK = "example_shapes_jsonl"
PROCESSOR_CLASS = {"llava": "LlavaProcessor", "qwen2_vl": "QwenVLImageProcessor",
                   "gemma3": "Gemma3Processor"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """family → role → hub id, all laid out in one offline cache (HF_HOME points there)."""
    root = tmp_path_factory.mktemp("real_checkpoints")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield {f: lay_out_family(root / "hf" / "hub", f, root / "models") for f in FAMILIES}


def _runs(uri: str, experiment: str) -> tuple[mlflow.entities.Run, dict[str, mlflow.entities.Run]]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("vlmexp.role") == "study")
    trials = {r.data.tags["vlmexp.baseline"]: r for r in runs
              if r.data.tags.get("vlmexp.role") == "trial"}
    return parent, trials


def _items(client: mlflow.MlflowClient, run_id: str) -> dict[int, list[float]]:
    path = client.download_artifacts(run_id, "items.json")
    return {i["index"]: i["scores"] for i in json.loads(Path(path).read_text())[IMAGE_TASK]}


def _json_items(path: Path) -> dict[int, list[float]]:
    return {i["index"]: i["scores"] for i in json.loads(path.read_text())["items"][IMAGE_TASK]}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_command_prompts_and_scores_a_hub_checkpoint_alike(family, hub, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ids = hub[family]
    processor = load_processor(ids["base"])
    assert type(processor).__name__ == PROCESSOR_CLASS[family] and processor.chat_template

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["search", "models=llava15_math", "space=language_only", "eval=examples",
                 f"models.base={ids['base']}", f"models.donors.text.path={ids['vqa']}",
                 "models.donors.text.map=same", "search.n_trials=2", f"tracking.uri={uri}",
                 f"search.storage=sqlite:///{tmp_path / 'optuna.db'}", f"study_name={family}",
                 "--no-progress"]) == 0
    parent, trials = _runs(uri, family)
    assert set(trials) == {"base", "text alone"}
    logged_identity = parent.data.params[f"task.{IMAGE_TASK}"]
    assert " chat prompts:" in logged_identity  # prompted through the real chat template
    assert {r.data.tags[f"task.{IMAGE_TASK}"] for r in trials.values()} == {logged_identity}
    prints = {k for k in trials["base"].data.tags if k.startswith("vlmexp.fingerprint.")}
    assert {"vlmexp.fingerprint.language", "vlmexp.fingerprint.vision"} <= prints
    client = mlflow.MlflowClient(tracking_uri=uri)

    # evaluate, by hub id: the same prompts and the very same per-item scores as the search
    assert main(["evaluate", ids["base"], "eval=examples", "--out", "base.json"]) == 0
    base = json.loads(Path("base.json").read_text())
    assert base["tasks"][IMAGE_TASK] == logged_identity
    assert _json_items(Path("base.json")) == _items(client, trials["base"].info.run_id)
    assert base["metrics"][IMAGE_TASK]["acc"] == trials["base"].data.metrics[f"{IMAGE_TASK}.acc"]

    # reproduce --evaluate of the donor-alone trial: same digest, same prompts, same scores
    donor_run = trials["text alone"]
    capsys.readouterr()
    assert main(["reproduce", donor_run.info.run_id, "--tracking-uri", uri, "--out", "rebuilt",
                 "--evaluate"]) == 0
    out = capsys.readouterr()
    assert f"task {IMAGE_TASK}: {logged_identity} (as logged)" in out.out
    diffs = re.findall(r"^(\S+)\s+\S+\s+\S+\s+([+-]\d\.\d{4})$", out.out, flags=re.M)
    assert diffs and all(d == "+0.0000" for _, d in diffs), out.out
    recipe = yaml.safe_load((Path("rebuilt") / "recipe.yaml").read_text())
    assert recipe["base"]["path"] == ids["base"]
    assert re.fullmatch(r"[0-9a-f]{40}", recipe["base"]["revision"])

    # merge the logged recipe again: a bf16 checkpoint the Auto classes load, scored the same
    assert main(["merge", "rebuilt/recipe.yaml", "--out", "merged"]) == 0
    model = tf.AutoModelForImageTextToText.from_pretrained("merged")
    snapshot = resolve_model(ids["base"]).folder  # the base's own files, byte for byte
    kept = [f for f in snapshot.iterdir() if not f.name.endswith((".safetensors", ".json"))
            or f.name.endswith(("_config.json", "tokenizer.json", "chat_template.json"))]
    kept = [f for f in kept if f.name != "generation_config.json"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in kept}
    for f in kept:
        assert (Path("merged") / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in Path("merged").iterdir() if "chat_template" in p.name) == \
        sorted(f.name for f in snapshot.iterdir() if "chat_template" in f.name)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert main(["evaluate", "merged", "eval=examples", "--out", "merged.json"]) == 0
    merged = json.loads(Path("merged.json").read_text())
    assert merged["tasks"][IMAGE_TASK] == logged_identity
    assert _json_items(Path("merged.json")) == _items(client, donor_run.info.run_id)
    assert merged["objectives"]["vl"] == donor_run.data.metrics["objective.vl"]
    if FAMILIES[family].tied:
        assert model.get_output_embeddings().weight.data_ptr() == \
            model.get_input_embeddings().weight.data_ptr()


def _readme_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Bring your own checkpoints"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[: block.index("```")]
    return [line for line in block.splitlines() if line.startswith("python -m vlmexp ")]


@pytest.mark.slow
def test_the_readme_bring_your_own_checkpoints_commands_run_verbatim(hub, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = _readme_commands()
    assert len(commands) == 5
    for line in commands:
        assert main(shlex.split(line)[3:]) == 0, line
    out = capsys.readouterr().out
    assert "study 'llava15-math': 12 trials" in out
    assert "(as logged)" in out
    client = mlflow.MlflowClient(tracking_uri="sqlite:///mlflow.db")
    exp = client.get_experiment_by_name("llava15-math")
    best_run = next(r for r in client.search_runs([exp.experiment_id])
                    if r.data.tags.get("vlmexp.role") == "study").data.tags["vlmexp.best_run"]
    best = client.get_run(best_run)
    merged = json.loads(Path("merged.json").read_text())
    assert merged["objectives"]["combined"] == best.data.metrics["objective.combined"]
    base = json.loads(Path("base.json").read_text())
    assert base["tasks"] == merged["tasks"]
    recipe = yaml.safe_load((Path("merged") / "recipe.yaml").read_text())
    refs = [recipe["base"], *recipe["donors"]]
    assert [r["path"] for r in refs] == ["llava-hf/llava-1.5-7b-hf", "meta-math/MetaMath-7B-V1.0"]
    assert all(re.fullmatch(r"[0-9a-f]{40}", r["revision"]) for r in refs)
    # inspect's alignment report: the LLM maps onto the VLM's language model, 2 rows short
    assert re.search(r"^LLM → VLM: LlamaForCausalLM → LlavaForConditionalGeneration: \d+ tensors "
                     r"mapped", out, flags=re.M)
    assert "lm_head.weight: only the first 768 rows come from the donor" in out
