"""`vlmexp reproduce`: rebuild a tracked trial's checkpoint from recipe.yaml and model folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vlmexp.checkpoint import load_processor, open_model
from vlmexp.cli import main
from vlmexp.merge.engine import MergeEngine
from vlmexp.merge.recipe import Recipe
from vlmexp.search.tracking import Tracker, TrialRecord

EXAMPLES = Path(__file__).resolve().parents[1] / "evals" / "examples"
EVAL = {"tasks": [str(EXAMPLES / "shapes_jsonl.yaml")],
        "objectives": {"vl": {"example_shapes_jsonl": 1.0}}, "batch_size": 8}
TAMPERED = "isum2:" + "0" * 64


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_processor):
    """Tiny base + donor folders, a study run with a real trial, a tampered one, and the merge."""
    from vlmexp.eval import Evaluator
    from vlmexp.zoo.tiny import build

    root = tmp_path_factory.mktemp("reproduce")
    build("llava", seed=0).save_pretrained(root / "base")
    tiny_processor("llava").save_pretrained(root / "base")
    build("llava", seed=1).save_pretrained(root / "vqa")
    recipe = Recipe.from_dict({
        "method": "task_arithmetic", "base": {"path": str(root / "base")},
        "donors": [{"name": "vqa", "path": str(root / "vqa")}],
        "components": {"projector": {"vqa": {"weight": 0.7}},
                       "language": {"vqa": {"weight": [0.2, 0.9]}}},
    })
    engine = MergeEngine.from_recipe(recipe, device="cpu", progress=False)
    recipe = engine.pin(recipe)
    applied = engine.apply(recipe)
    result = Evaluator.from_config(EVAL, engine.processor).evaluate(engine.model)
    metrics = {f"{t}.{m}": v for t, ms in result.metrics.items() for m, v in ms.items()}

    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(tracking_uri=uri, experiment="repro", study_name="repro")
    # as the search logs it: task paths relative to the project (reproduce resolves them)
    logged_eval = {**EVAL, "tasks": ["evals/examples/shapes_jsonl.yaml"]}
    tracker.start({"eval": logged_eval, "search": {"n_trials": 2}}, objectives=["vl"],
                  directions=["maximize"])

    def log(number: int, digest: str, value: float, fingerprints: dict | None = None) -> str:
        return tracker.log_trial(TrialRecord(
            number=number, state="COMPLETE", recipe=recipe, values={"vl": value},
            metrics=metrics, intermediate=[], seconds={"merge": applied.seconds},
            weights_digest=digest, items=None, fingerprints=fingerprints or {}))

    good = log(0, applied.weights_digest, result.objectives["vl"], applied.fingerprints)
    tampered = log(1, TAMPERED, result.objectives["vl"] - 0.5)  # no fingerprints
    tracker.close()
    merged = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    return {"root": root, "uri": uri, "good": good, "tampered": tampered, "recipe": recipe,
            "digest": applied.weights_digest, "merged": merged, "result": result}


def test_reproduce_writes_a_loadable_checkpoint_with_equal_tensors(study, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["reproduce", study["good"], "--out", str(out), "--tracking-uri", study["uri"],
               "--device", "cpu"])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"weights digest {study['digest']} (matches the run)" in err
    loaded = open_model(out)
    state = loaded.model.state_dict()
    assert set(state) == set(study["merged"])
    for name, tensor in study["merged"].items():
        assert torch.equal(state[name], tensor), name
    assert Recipe.from_yaml(out / "recipe.yaml") == study["recipe"]
    assert (out / "tokenizer.json").is_file()  # the base's processor travels with it
    # an existing folder is refused without --force
    rc = main(["reproduce", study["good"], "--out", str(out), "--tracking-uri", study["uri"]])
    assert rc == 2 and "already exists; pass --force" in capsys.readouterr().err


def test_a_digest_mismatch_is_refused_and_writes_nothing(study, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["reproduce", study["tampered"], "--out", str(out), "--tracking-uri", study["uri"],
               "--device", "cpu"])
    assert rc == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(lines) == 1
    assert study["digest"] in lines[0] and TAMPERED in lines[0]
    assert "the run logged no fingerprints" in lines[0]
    assert lines[0].startswith("vlmexp reproduce: error: run ")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def rebuild_perturbed(monkeypatch, change) -> None:
    """Make the rebuild's weights differ from the logged merge, as another device's would."""
    apply = MergeEngine.apply

    def perturbed(self, recipe):
        result = apply(self, recipe)
        with torch.no_grad():
            for tensor in self.state_dict_view().values():
                change(tensor)
        return dataclasses.replace(result, weights_digest=self.weights_digest(),
                                   fingerprints=self.fingerprints())

    monkeypatch.setattr(MergeEngine, "apply", perturbed)


def one_ulp_up_in_every_other_entry(t: torch.Tensor) -> None:
    flat = t.view(-1)[::2]  # float32: about 6e-8 relative, a device's rounding
    flat.copy_(torch.nextafter(flat, torch.full_like(flat, float("inf"))))


def test_a_rebuild_that_differs_by_rounding_agrees_by_fingerprints(study, tmp_path, capsys,
                                                                  monkeypatch):
    rebuild_perturbed(monkeypatch, one_ulp_up_in_every_other_entry)
    out = tmp_path / "other-device"
    rc = main(["reproduce", study["good"], "--out", str(out), "--tracking-uri", study["uri"],
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"differs from the logged {study['digest']}" in err
    assert "holds only on the same device and dtype" in err
    assert "every component's fingerprint agrees (largest relative difference" in err
    assert "(agrees with the run's fingerprints within 1e-06) -> " in err
    state = open_model(out).model.state_dict()
    changed = [k for k, v in study["merged"].items() if not torch.equal(state[k], v)]
    assert changed and all(torch.allclose(state[k], study["merged"][k], rtol=2 ** -23, atol=1e-44)
                           for k in changed)


def test_a_rebuild_that_differs_beyond_rounding_is_refused(study, tmp_path, capsys,
                                                          monkeypatch):
    rebuild_perturbed(monkeypatch, lambda t: t.mul_(1 + 1e-3))
    out = tmp_path / "wrong"
    rc = main(["reproduce", study["good"], "--out", str(out), "--tracking-uri", study["uri"],
               "--device", "cpu"])
    assert rc == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(lines) == 1
    assert "the weights differ beyond rounding: largest relative difference 1.0e-03" in lines[0]
    assert "tolerance 1e-06; nothing written" in lines[0]
    assert not out.exists()


def test_best_reproduces_the_best_trial(study, tmp_path, capsys):
    out = tmp_path / "best"
    rc = main(["reproduce", "--best", "--experiment", "repro", "--out", str(out),
               "--tracking-uri", study["uri"], "--device", "cpu"])
    assert rc == 0
    assert f"reproducing run {study['good']} (trial 0)" in capsys.readouterr().err
    state = open_model(out).model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in study["merged"].items())


def test_evaluate_prints_logged_and_new_values(study, tmp_path, capsys):
    out = tmp_path / "evaluated"
    rc = main(["reproduce", study["good"], "--out", str(out), "--tracking-uri", study["uri"],
               "--device", "cpu", "--evaluate"])
    assert rc == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "logged", "now", "diff"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    vl = study["result"].objectives["vl"]
    assert rows["objective.vl"] == [f"{vl:.4f}", f"{vl:.4f}", "+0.0000"]
    acc = study["result"].metrics["example_shapes_jsonl"]["acc"]
    assert rows["example_shapes_jsonl.acc"] == [f"{acc:.4f}", f"{acc:.4f}", "+0.0000"]


@pytest.mark.parametrize("logged_as", ["same", "other"])
def test_evaluate_refuses_to_compare_scores_of_another_prompt(study, tmp_path, capsys, logged_as):
    """The study logged each task's identity: a re-evaluation with other prompts is no match."""
    from vlmexp.eval import Evaluator

    processor = load_processor(study["root"] / "base")
    identity = Evaluator.from_config(EVAL, processor).identity()["example_shapes_jsonl"]
    logged = identity if logged_as == "same" else identity.replace("prompts:", "prompts:0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(tracking_uri=uri, experiment="ids", study_name="ids")
    tracker.start({"eval": {**EVAL, "tasks": ["evals/examples/shapes_jsonl.yaml"]}},
                  objectives=["vl"], directions=["maximize"],
                  tasks={"example_shapes_jsonl": logged})
    run = tracker.log_trial(TrialRecord(
        number=0, state="COMPLETE", recipe=study["recipe"], values={"vl": 0.5}, metrics={},
        intermediate=[], seconds={}, weights_digest=study["digest"], items=None))
    tracker.close()
    rc = main(["reproduce", run, "--out", str(tmp_path / "out"), "--tracking-uri", uri,
               "--device", "cpu", "--evaluate"])
    out, err = capsys.readouterr()
    if logged_as == "same":
        assert rc == 0 and f"task example_shapes_jsonl: {identity} (as logged)" in out
    else:
        assert rc == 2 and f"(the study: {logged})" in out
        assert "task example_shapes_jsonl is not evaluated as the study evaluated it" in err
        assert (tmp_path / "out").is_dir()  # the rebuild itself stands


@pytest.mark.parametrize("argv, message", [
    ([], "give either a RUN_ID or --best"),
    (["abc", "--best"], "give either a RUN_ID or --best"),
    (["abc", "--experiment", "x"], "--experiment goes with --best"),
    (["no-such-run"], "no run 'no-such-run'"),
])
def test_bad_arguments_are_one_line_errors(study, tmp_path, capsys, argv, message):
    rc = main(["reproduce", *argv, "--out", str(tmp_path / "o"), "--tracking-uri", study["uri"]])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()
