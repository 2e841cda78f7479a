"""The study loop end to end on tiny models: baselines, pruning, resume, MLflow record."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from optuna.trial import TrialState

from vlmexp.config import compose, validate
from vlmexp.search.study import BASELINE_ATTR, run_search

EXAMPLES = Path(__file__).resolve().parents[1] / "evals" / "examples"


@pytest.fixture(scope="module")
def models(study_models) -> dict[str, Path]:
    return study_models


def config(tmp_path: Path, models: dict[str, Path], *extra: str):
    tasks = f"[{EXAMPLES / 'shapes_jsonl.yaml'},{EXAMPLES / 'next_item_lmeval.yaml'}]"
    cfg = compose([
        f"models.base={models['base']}",
        f"models.donors.vqa.path={models['vqa']}",
        f"models.donors.text.path={models['text']}",
        f"eval.tasks={tasks}", "eval.test_tasks=[]",
        f"search.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "study_name=tiny", "search.sampler=random", *extra,
    ])
    raw = OmegaConf.to_container(cfg)
    raw["eval"]["objectives"] = {
        "vl": {"example_shapes_jsonl": 1.0}, "text": {"example_next_item": 1.0},
        "combined": {"example_shapes_jsonl": 1.0, "example_next_item": 1.0}}
    return validate(raw)


@pytest.mark.slow
def test_study_runs_baselines_first_prunes_and_resumes(tmp_path, models, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts land under the working directory
    cfg = config(tmp_path, models, "search.n_trials=7", "search.pruning.startup_trials=4",
                 "search.pruning.rungs=[0.5]", "search.pruning.percentile=100")
    result = run_search(cfg, progress=False)
    study = optuna.load_study(study_name="tiny", storage=cfg.search.storage)
    trials = study.trials
    assert len(trials) == 7 == result.trials
    names = [t.user_attrs.get(BASELINE_ATTR) for t in trials[:4]]
    assert names == ["base", "vqa alone", "text alone", "uniform average"]
    assert trials[0].params == {k: 0.0 for k in trials[0].params}
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # baselines were evaluated in full; the base scores what the base scores
    assert all(t.state == TrialState.COMPLETE for t in trials[:4])
    assert result.best and result.best[0].value == max(
        t.value for t in trials if t.state == TrialState.COMPLETE)

    # a crash leaves a RUNNING trial (here with trial 4's parameters) whose heartbeat stopped:
    # the next run marks it failed and runs its parameters again; at
    # the rung they score below the best trial there, so the strict pruner (percentile 100:
    # keep only the best at a rung) stops it
    study.enqueue_trial(trials[4].params)
    stale = study.ask()
    for name, dist in trials[4].distributions.items():
        stale.suggest_float(name, dist.low, dist.high)
    assert stale.params == trials[4].params
    rung = [t.intermediate_values[0] for t in trials[4:]]
    assert trials[4].intermediate_values[0] < max(rung)
    import time

    # its worker's last heartbeat, ten minutes ago, on another machine
    study._storage.set_trial_system_attr(stale._trial_id, "vlmexp.heartbeat",
                                         [time.time() - 600, "elsewhere", 1, "w"])
    cfg = config(tmp_path, models, "search.n_trials=9", "search.pruning.startup_trials=4",
                 "search.pruning.rungs=[0.5]", "search.pruning.percentile=100")
    run_search(cfg, progress=False)
    study = optuna.load_study(study_name="tiny", storage=cfg.search.storage)
    assert study.trials[stale.number].state == TrialState.FAIL
    assert study.trials[stale.number].user_attrs["vlmexp.interrupted"].startswith(
        "worker w's heartbeat stopped 6")  # 600 s and the time this run took to start
    rerun = study.trials[stale.number + 1]  # the re-enqueued trial runs first
    assert rerun.user_attrs["vlmexp.retry_of"] == stale.number
    assert rerun.params == stale.params
    assert rerun.state == TrialState.PRUNED
    assert rerun.intermediate_values == trials[4].intermediate_values
    assert "rung 0" in rerun.user_attrs["reason"]
    # n_trials counts evaluated trials: the interrupted one does not count, one more ran
    assert len([t for t in study.trials if t.state != TrialState.FAIL]) == 9
    assert len(study.trials) == 10

    # the MLflow record: one parent run, one child per trial, with its recipe; the crashed
    # trial's run is FAILED with why
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("vlmexp.role") == "study"]
    children = [r for r in runs if r.data.tags.get("vlmexp.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["vlmexp.trial"]) for r in children) == list(range(10))
    statuses = {r.data.tags["vlmexp.state"]: r.info.status for r in children}
    assert statuses == {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    crashed = next(r for r in children if r.data.tags["vlmexp.trial"] == str(stale.number))
    assert crashed.data.tags["vlmexp.reason"].startswith("interrupted: worker w's heartbeat")
    assert "recipe.yaml" in {a.path for a in client.list_artifacts(crashed.info.run_id)}
    # the first run created the study: worker 0, the study's seed; the resumed one another
    workers = [t.user_attrs["vlmexp.worker"] for t in study.trials if t.number != stale.number]
    assert workers[:7] == ["0"] * 7 and workers[7] != "0"
    assert {t.user_attrs["vlmexp.sampler_seed"] for t in study.trials[:7]} == {0}


@pytest.mark.slow
def test_two_objectives_make_a_pareto_study(tmp_path, models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, models, "search.n_trials=7", "search.objectives=[vl,text]",
                 "search.pruning.startup_trials=2", "search.pruning.margin=0.0",
                 "study_name=pareto")
    result = run_search(cfg, progress=False)
    study = optuna.load_study(study_name="pareto", storage=cfg.search.storage)
    assert len(study.directions) == 2 and len(study.trials) == 7
    front = {t.number for t in study.best_trials}
    assert {t.number for t in result.best} == front
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    # nothing on the front is dominated by another complete trial
    for t in result.best:
        assert not any(o.values[0] >= t.values[0] and o.values[1] >= t.values[1]
                       and o.values != t.values for o in complete)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name("pareto")
    parent = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("vlmexp.role") == "study"][0]
    assert parent.data.metrics["pareto.size"] == len(front)


# ---------------------------------------------------------------------- models node → loaders


def test_hub_ids_in_the_models_node_resolve_to_the_commits_that_recipes_record(
        tmp_path, models, monkeypatch):
    from vlmexp.search.space import SearchSpace
    from vlmexp.search.study import resolve_models
    from vlmexp.zoo.hub import lay_out_hub_cache

    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = lay_out_hub_cache(hub, "org/base", models["base"])
    node = OmegaConf.to_container(config(tmp_path, models, "models.base=org/base@main"))
    base, donors = resolve_models(node["models"])
    assert (base.path, base.revision) == ("org/base@main", commit)
    assert [(d.path, d.revision) for d in donors] == [(str(models["vqa"]), None),
                                                      (str(models["text"]), None)]
    recipe = SearchSpace(node["space"], node["merge"], base, donors).baselines()[0][1]
    assert recipe.base.revision == commit and f"revision: {commit}" in recipe.to_yaml()
    assert "revision" not in yaml.safe_load(recipe.to_yaml())["donors"][0]


def test_setup_hands_the_models_opt_ins_to_setup_engine(tmp_path, models, monkeypatch):
    import vlmexp.search.study as study

    class Stop(Exception):
        pass

    seen: dict = {}

    def fake_setup_engine(base, donors, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(study, "setup_engine", fake_setup_engine)
    for on in (False, True):
        extra = [f"models.trust_remote_code={on}", f"models.allow_pickle={not on}"]
        with pytest.raises(Stop):
            study.setup(config(tmp_path, models, "device=cpu", *extra))
        assert (seen["trust_remote_code"], seen["allow_pickle"]) == (on, not on)


def test_setup_engine_opens_a_pickle_donor_only_with_allow_pickle(tmp_path, models):
    import shutil

    from vlmexp.checkpoint import open_model
    from vlmexp.errors import CheckpointError
    from vlmexp.merge.recipe import ModelRef
    from vlmexp.search.study import setup_engine

    pickled = tmp_path / "pickled"
    shutil.copytree(models["vqa"], pickled)
    (pickled / "model.safetensors").unlink()
    vqa = open_model(models["vqa"], load_processor=False).model
    torch.save(vqa.state_dict(), pickled / "pytorch_model.bin")
    base, donors = ModelRef("base", str(models["base"])), [ModelRef("vqa", str(pickled))]
    with pytest.raises(CheckpointError, match=r"models\.allow_pickle=true"):
        setup_engine(base, donors, device="cpu", vocab="error")
    engine = setup_engine(base, donors, device="cpu", vocab="error", allow_pickle=True)
    assert engine.input_digest("vqa") == engine.input_digest("vqa") != engine.input_digest("base")
    from vlmexp.checkpoint import weights_sha256

    assert engine.input_digest("vqa") == weights_sha256(vqa)


def test_a_setting_that_cannot_change_the_model_is_refused_before_loading(tmp_path, models,
                                                                          monkeypatch, capsys):
    """A vision weight for the text-only donor, and a head weight on a model whose head is its
    token embeddings: one-line errors from the models' configs, before any weight is read."""
    from vlmexp import checkpoint
    from vlmexp.cli import main
    from vlmexp.errors import ConfigError
    from vlmexp.search.study import setup
    from vlmexp.zoo.tiny import perturb, qwen2_vl
    from vlmexp.zoo.tiny_processors import build_processor

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "open_model", no_loading)
    cfg = config(tmp_path, models, "+space.components.vision.text.weight=[0.0,1.0]")
    with pytest.raises(ConfigError, match=r"^space\.components\.vision\.text: donor 'text' has "
                                          r"no tensors aligned with the base's vision \(it "
                                          r"reaches: language, embed, head\)"):
        setup(cfg)

    base = qwen2_vl(tie_word_embeddings=True)
    qwen = {"base": base, "ft": perturb(copy.deepcopy(base), 1)}
    for name, model in qwen.items():
        checkpoint.save_model(model, tmp_path / name, processor=build_processor("qwen2_vl"))
    args = ["search", f"models.base={tmp_path / 'base'}", "~models.donors.text",
            f"models.donors.vqa.path={tmp_path / 'ft'}", "space=demo",
            *(f"~space.components.{c}.text" for c in ("language", "embed", "head")),
            f"search.storage=sqlite:///{tmp_path / 'o.db'}",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlmexp search: error: space.components.head.vqa: "
                                               "Qwen2VLForConditionalGeneration has no head "
                                               "tensors of its own (its head is tied to the token "
                                               "embeddings")
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "o.db").exists()


# ---------------------------------------------------------------------- lm-eval objectives

TEXTS = ["one two three four five", "red green blue", "What colour is the shape?",
         "a b c d e f g", "Question: What comes next? Answer: seven", "0 1 2 3 4 5 6 7 8 9"]


def _perplexity_task(folder: Path) -> Path:
    """Our task `ppl`: lm-eval's word perplexity (lower is better) of six short texts."""
    import json

    lm = folder / "lm_eval"
    lm.mkdir(parents=True)
    (lm / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (lm / "t_ppl.yaml").write_text(
        "task: t_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: texts.jsonl}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list: [{metric: word_perplexity}]\n"
        "metadata:\n  version: 1\n")
    task = folder / "ppl.yaml"
    task.write_text("task: ppl\nversion: 1\nkind: lm_eval\nlm_eval_task: t_ppl\n"
                    "include_path: lm_eval\nmetric: word_perplexity\n")
    return task


def lm_config(tmp_path: Path, models: dict[str, Path], task: Path, objective: str, *extra: str):
    """An lm-eval-only study: one objective of one task, test split = the same task."""
    cfg = compose([
        f"models.base={models['base']}",
        f"models.donors.vqa.path={models['vqa']}",
        f"models.donors.text.path={models['text']}",
        f"eval.tasks=[{task}]", f"eval.test_tasks=[{task}]", "eval.batch_size=4",
        f"search.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "study_name=lm", "search.sampler=random", *extra,
    ])
    raw = OmegaConf.to_container(cfg)
    name = yaml.safe_load(task.read_text())["task"]
    raw["eval"]["objectives"] = raw["eval"]["test_objectives"] = {objective: {name: 1.0}}
    raw["search"]["objectives"] = [objective]
    return validate(raw)


@pytest.mark.slow
def test_a_perplexity_objective_is_minimised_with_lm_evals_value(tmp_path, models, tiny,
                                                                 tiny_processor, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from vlmexp.commands.search import summary

    monkeypatch.chdir(tmp_path)  # lm-eval reads the relative data_files against it, too
    task = _perplexity_task(tmp_path / "tasks")
    cfg = lm_config(tmp_path, models, task, "ppl", "search.n_trials=7",
                    "search.pruning.startup_trials=4", "search.pruning.rungs=[0.5]",
                    "search.pruning.percentile=100")
    result = run_search(cfg, progress=False)
    study = optuna.load_study(study_name="lm", storage=cfg.search.storage)
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert result.best[0].value == min(t.value for t in complete) > 1.0
    assert len({round(t.value, 6) for t in complete}) >= 3  # not a constant
    # the base (trial 0, unmerged) logs lm-eval's own word perplexity of the base model
    monkeypatch.chdir(tmp_path / "tasks" / "lm_eval")
    lm = HFLM(pretrained=tiny("llava"), tokenizer=tiny_processor("llava").tokenizer,
              batch_size=4, device="cpu", backend="causal")
    ref = simple_evaluate(model=lm, tasks=["t_ppl"], bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(task.parent / "lm_eval"),
                                                   include_defaults=False))
    assert study.trials[0].value == pytest.approx(ref["results"]["t_ppl"]["word_perplexity,none"],
                                                  rel=1e-9)
    # the strict pruner (percentile 100) stops a trial iff it is worse (higher) at the rung
    # than the best (lowest) complete trial there
    judged = 0
    for t in study.trials:
        before = [o.intermediate_values[0] for o in complete
                  if o.number < t.number and 0 in o.intermediate_values]
        if before and 0 in t.intermediate_values:
            judged += 1
            assert (t.state == TrialState.PRUNED) == (t.intermediate_values[0] > min(before))
    assert judged >= 2 and any(t.state == TrialState.PRUNED for t in study.trials)
    # the test report: the same task held out, lower is better
    assert result.test_directions == {"ppl": "minimize"}
    assert result.baselines_test["base"]["ppl"] == pytest.approx(study.trials[0].value, rel=1e-9)
    report = summary(cfg, result)
    assert "(lower is better)" in report and "lower is better: ppl" in report
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    parent = [r for r in client.search_runs([client.get_experiment_by_name("lm").experiment_id])
              if r.data.tags.get("vlmexp.role") == "study"][0]
    assert parent.data.tags["vlmexp.directions"] == "minimize"
    assert parent.data.metrics["best.ppl"] == result.best[0].value

    # the best trial, rebuilt by `reproduce` and scored by lm-eval itself: the value it logged
    from vlmexp.checkpoint import open_model
    from vlmexp.cli import main

    best_run = client.get_run(parent.data.tags["vlmexp.best_run"])
    assert main(["reproduce", "--best", "--experiment", "lm", "--tracking-uri",
                 cfg.tracking.uri, "--out", str(tmp_path / "best")]) == 0

    def lm_eval_of(folder: Path) -> float:
        rebuilt = open_model(folder)
        lm = HFLM(pretrained=rebuilt.model, tokenizer=rebuilt.processor.tokenizer, batch_size=4,
                  device="cpu", backend="causal")
        ref = simple_evaluate(model=lm, tasks=["t_ppl"], bootstrap_iters=0,
                              task_manager=TaskManager(include_path=str(task.parent / "lm_eval"),
                                                       include_defaults=False))
        return ref["results"]["t_ppl"]["word_perplexity,none"]

    logged = best_run.data.metrics["objective.ppl"]
    assert logged == result.best[0].value
    assert logged == pytest.approx(lm_eval_of(tmp_path / "best"), rel=1e-9)
    # and a merge (the uniform average of the base and both donors), rebuilt by its run id
    merged = next(r for r in client.search_runs([parent.info.experiment_id])
                  if r.data.tags.get("vlmexp.baseline") == "uniform average")
    assert main(["reproduce", merged.info.run_id, "--tracking-uri", cfg.tracking.uri,
                 "--out", str(tmp_path / "uniform")]) == 0
    value = merged.data.metrics["objective.ppl"]
    assert value != study.trials[0].value
    assert value == pytest.approx(lm_eval_of(tmp_path / "uniform"), rel=1e-9)


@pytest.mark.slow
def test_a_model_with_non_finite_scores_fails_its_trial(tmp_path, models, tiny, tiny_processor,
                                                        monkeypatch):
    """Finite weights whose logits overflow: the merge passes, lm-eval's log-likelihoods are
    NaN, and every trial is FAIL with the task and the document in its reason."""
    from vlmexp.checkpoint import save_model

    monkeypatch.chdir(tmp_path)
    broken = copy.deepcopy(tiny("llava"))
    with torch.no_grad():
        broken.model.language_model.norm.weight.mul_(1e30)
        broken.lm_head.weight.mul_(1e30)
    bad = dict(models, base=save_model(broken, tmp_path / "broken", processor=tiny_processor("llava")))
    cfg = lm_config(tmp_path, bad, EXAMPLES / "next_item_lmeval.yaml", "text",
                    "search.n_trials=2", "search.baselines=false", "eval.test_tasks=[]")
    result = run_search(cfg, progress=False)
    study = optuna.load_study(study_name="lm", storage=cfg.search.storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2 and result.best == []
    for t in study.trials:
        reason = t.user_attrs["reason"]
        assert reason.startswith("EvalError: ") and "lm-eval task 'example_next_item', document " \
            in reason and "is NaN" in reason


def test_a_resumed_study_keeps_its_directions(tmp_path):
    from vlmexp.errors import ConfigError
    from vlmexp.search.study import setup_study

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    kw = dict(storage=storage, sampler="random", seed=0, pruner=optuna.pruners.NopPruner())
    study = setup_study("s", directions=["minimize"], **kw)
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE]
    assert setup_study("s", directions=["minimize"], **kw).directions == study.directions
    with pytest.raises(ConfigError, match=r"study 's' was created with directions \['minimize'\]"):
        setup_study("s", directions=["maximize"], **kw)


def test_a_study_in_another_math_dtype_reproduces_its_trials(tmp_path, models, monkeypatch):
    """merge.dtype reaches the study's engine as it reaches `reproduce`'s: same digests."""
    from vlmexp.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, models, "search.n_trials=3", "search.baselines=false",
                 "merge.dtype=bfloat16", "search.pruning.enabled=false")
    run_search(cfg, progress=False)
    assert main(["reproduce", "--best", "--experiment", "tiny", "--tracking-uri",
                 cfg.tracking.uri, "--out", str(tmp_path / "best")]) == 0
