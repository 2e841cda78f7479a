"""`--trust-remote-code` and `--allow-pickle` (vlmexp.commands.add_model_flags): every command
that opens a model has them, off by default, and each reaches the loader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlmexp.cli import build_parser, main
from vlmexp.errors import CheckpointError
from vlmexp.zoo.tiny import build, perturb

COMMANDS = {
    "merge": ["merge", "r.yaml", "--out", "o"],
    "reproduce": ["reproduce", "RUN", "--out", "o"],
    "export": ["export", "r.yaml"],
    "evaluate": ["evaluate", "MODEL"],
    "inspect": ["inspect", "MODEL"],
}


def _error_line(stderr: str) -> str:
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if ": error: " in line]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_model_command_has_both_opt_ins_off_by_default(command):
    parser = build_parser()
    plain = parser.parse_args(COMMANDS[command])
    assert (plain.trust_remote_code, plain.allow_pickle) == (False, False)
    opted = parser.parse_args([*COMMANDS[command], "--trust-remote-code", "--allow-pickle"])
    assert (opted.trust_remote_code, opted.allow_pickle) == (True, True)


@pytest.fixture
def remote_code_model(tmp_path, monkeypatch) -> Path:
    """A Llama folder whose config names its own (shipped) configuration and model classes."""
    import transformers.dynamic_module_utils as dynamic

    # transformers copies shipped code into its modules cache and puts that on sys.path
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "custom"
    build("llama").save_pretrained(folder)
    (folder / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class CustomLlamaConfig(LlamaConfig):\n    model_type = 'vlmexp_custom_llama'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_custom import CustomLlamaConfig\n\n\n"
        "class CustomLlamaForCausalLM(LlamaForCausalLM):\n    config_class = CustomLlamaConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="vlmexp_custom_llama", architectures=["CustomLlamaForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomLlamaConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomLlamaForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_trust_remote_code_is_what_lets_inspect_run_shipped_code(remote_code_model, capsys):
    assert main(["inspect", str(remote_code_model)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "vlmexp_custom_llama" in err and "--trust-remote-code" in err
    assert main(["inspect", str(remote_code_model), "--trust-remote-code", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["models"][0]
    assert report["architecture"] == "CustomLlamaForCausalLM"
    assert report["components"]["language"]["blocks"] == 2


@pytest.fixture(scope="module")
def pickle_models(tmp_path_factory, tiny_processor) -> dict[str, Path]:
    """A tiny LLaVA base (safetensors) and a relative twice: as safetensors and pickle-only."""
    from vlmexp.checkpoint import save_model

    root = tmp_path_factory.mktemp("pickles")
    base, donor = build("llava", seed=0), perturb(build("llava", seed=0), 1, scale=0.05)
    out = {"base": save_model(base, root / "base", processor=tiny_processor("llava"),
                              native_layout=True),
           "donor": save_model(donor, root / "donor", processor=tiny_processor("llava"),
                               native_layout=True)}
    pickled = save_model(donor, root / "pickled", processor=tiny_processor("llava"),
                         native_layout=True)
    (pickled / "model.safetensors").unlink()
    torch.save(donor.state_dict(), pickled / "pytorch_model.bin")
    out["pickled"] = pickled
    # the same as pickle under transformers' legacy names, which mergekit would half drop
    legacy = save_model(donor, root / "legacy-pickled", processor=tiny_processor("llava"))
    torch.save(load_file(legacy / "model.safetensors"), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    out["legacy-pickled"] = legacy
    for donor_name in ("donor", "pickled", "legacy-pickled"):
        (root / f"{donor_name}.yaml").write_text(yaml.safe_dump({
            "method": "task_arithmetic", "base": str(out["base"]),
            "donors": [{"name": "d", "path": str(out[donor_name])}],
            "components": {"language": {"d": {"weight": 0.7}}, "vision": {"d": {"weight": 0.3}}}}))
        out[f"{donor_name}.yaml"] = root / f"{donor_name}.yaml"
    return out


def test_allow_pickle_is_what_lets_merge_read_a_pickle_donor(pickle_models, tmp_path, capsys):
    recipe = str(pickle_models["pickled.yaml"])
    assert main(["merge", recipe, "--out", str(tmp_path / "refused")]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "pytorch_model.bin" in err and "--allow-pickle" in err
    assert not (tmp_path / "refused").exists()
    assert main(["merge", recipe, "--out", str(tmp_path / "pickled"), "--allow-pickle"]) == 0
    assert main(["merge", str(pickle_models["donor.yaml"]), "--out", str(tmp_path / "safe")]) == 0
    from_pickle = load_file(tmp_path / "pickled" / "model.safetensors")
    from_safe = load_file(tmp_path / "safe" / "model.safetensors")
    assert from_pickle.keys() == from_safe.keys()
    assert all(torch.equal(from_pickle[k], from_safe[k]) for k in from_safe)


def test_allow_pickle_reaches_export_evaluate_and_reproduce(pickle_models, tmp_path, capsys,
                                                            monkeypatch):
    from types import SimpleNamespace

    from vlmexp.commands.evaluate import load_model
    from vlmexp.merge.recipe import Recipe

    recipe = str(pickle_models["pickled.yaml"])
    assert main(["export", recipe]) == 2
    assert "--allow-pickle" in _error_line(capsys.readouterr().err)
    assert main(["export", recipe, "--allow-pickle"]) == 0
    exported = yaml.safe_load(capsys.readouterr().out)
    assert exported["models"][0]["model"] == str(pickle_models["pickled"])
    # the pickle's tensor names are read (not unpickled into a model) and checked as any file's
    assert main(["export", str(pickle_models["legacy-pickled.yaml"]), "--allow-pickle"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "donor 'd'" in err and "legacy names" in err and "'language_model." in err

    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_model(str(pickle_models["pickled"]))
    model, _ = load_model(str(pickle_models["pickled"]), allow_pickle=True)
    donor = load_file(pickle_models["donor"] / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in donor.items())
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_model(recipe)
    merged, _ = load_model(recipe, allow_pickle=True)

    run = SimpleNamespace(run_id="r1", trial=0, experiment="e", weights_digest=None,
                          recipe=Recipe.from_yaml(recipe))
    monkeypatch.setattr("vlmexp.search.runs.find_run", lambda *a, **k: run)
    assert main(["reproduce", "r1", "--out", str(tmp_path / "r")]) == 2
    assert "--allow-pickle" in _error_line(capsys.readouterr().err)
    assert main(["reproduce", "r1", "--out", str(tmp_path / "r"), "--allow-pickle"]) == 0
    from vlmexp.checkpoint import open_model

    rebuilt = open_model(tmp_path / "r", load_processor=False).model.state_dict()
    assert rebuilt.keys() == merged.state_dict().keys()
    assert all(torch.equal(rebuilt[k], v) for k, v in merged.state_dict().items())
    assert sum(not torch.equal(rebuilt[k], donor[k]) for k in donor) > 10  # a merge, not a copy
