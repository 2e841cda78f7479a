"""The memory plan: computed from configs alone, it equals what the engine then holds."""

from __future__ import annotations

import json

import pytest
import torch

from vlmexp.checkpoint import model_skeleton, save_model
from vlmexp.cli import main
from vlmexp.errors import ConfigError
from vlmexp.layout import align, discover
from vlmexp.merge.engine import MergeEngine
from vlmexp.merge.plan import parse_bytes, plan_memory
from vlmexp.zoo.tiny import llava_family


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("plan")
    family = llava_family()
    return {name: str(save_model(model.to(torch.bfloat16), root / name))
            for name, model in family.items()}


@pytest.mark.parametrize("components", [{"language"}, {"vision", "projector"},
                                        {"language", "embed", "head", "vision"}])
def test_the_plan_equals_what_the_engine_holds(folders, components):
    base = model_skeleton(folders["base"])
    layout = discover(base)
    assert {p.device.type for p in base.parameters()} == {"meta"}  # no weight was read
    reach = {d: align(base, model_skeleton(folders[d])).reach(layout) for d in ("vqa", "text")}
    plan = plan_memory(layout, reach, components, device="cpu", free_bytes=10**12)
    engine = MergeEngine(folders["base"], {d: folders[d] for d in ("vqa", "text")},
                         progress=False, components=components, device="cpu")
    assert plan.model_bytes == sum(p.nbytes for p in engine.model.parameters())
    assert plan.pristine_bytes == sum(t.nbytes for t in engine._base.values()) > 0
    assert plan.task_vector_bytes == {d: sum(t.nbytes for t in engine.task_vectors[d].values())
                                      for d in ("vqa", "text")}
    if components == {"vision", "projector"}:  # the text-only donor reaches neither
        assert plan.task_vector_bytes["text"] == 0 < plan.task_vector_bytes["vqa"]
    plan.check()


def test_a_plan_that_cannot_fit_is_refused(folders, capsys):
    base = model_skeleton(folders["base"])
    layout = discover(base)
    reach = {"vqa": align(base, model_skeleton(folders["vqa"])).reach(layout)}
    plan = plan_memory(layout, reach, {"language"}, device="cpu", free_bytes=1000)
    with pytest.raises(ConfigError, match=r"^memory plan: the merge engine needs .* on cpu .* "
                                          r"but 1000 B is free"):
        plan.check()
    assert main(["inspect", folders["base"], folders["vqa"], folders["text"], "--plan",
                 "--components", "language", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["held_bytes"] == (out["model_bytes"] + out["pristine_bytes"]
                                 + sum(out["task_vector_bytes"].values()))
    assert main(["inspect", folders["base"], folders["vqa"], "--plan", "--memory-budget",
                 "1KB"]) == 2
    assert "memory plan: the merge engine needs" in capsys.readouterr().err
    assert main(["inspect", folders["base"], "--components", "language"]) == 2
    assert "--components goes with --plan" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("20GiB") == 20 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512") == 512
    with pytest.raises(ConfigError, match="memory_budget: '20 gigs' is not a size"):
        parse_bytes("20 gigs")


def test_a_search_that_cannot_fit_is_refused_before_loading(folders, tmp_path, monkeypatch,
                                                            capsys):
    from vlmexp import checkpoint

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "open_model", no_loading)
    args = ["search", f"models.base={folders['base']}",
            f"models.donors.vqa.path={folders['vqa']}",
            f"models.donors.text.path={folders['text']}", "memory_budget=1KB",
            f"search.storage=sqlite:///{tmp_path / 'o.db'}",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlmexp search: error: memory plan: the merge "
                                               "engine needs")
    assert not (tmp_path / "m.db").exists()
    assert not (tmp_path / "o.db").exists()  # refused before the storage is opened


@pytest.mark.parametrize("override, message", [
    ("memory_placement=sideways", "memory_placement: 'sideways' is not one of auto, device, host"),
    ("memory_budget=lots", "memory_budget: 'lots' is not a size"),
])
def test_memory_settings_are_checked_when_the_config_is_composed(override, message):
    from vlmexp.config import compose

    with pytest.raises(ConfigError, match=message):
        compose([override])


def test_a_gpu_plan_moves_task_vectors_then_base_copies_to_the_host(folders):
    base = model_skeleton(folders["base"])
    layout = discover(base)
    reach = {d: align(base, model_skeleton(folders[d])).reach(layout) for d in ("vqa", "text")}
    whole = plan_memory(layout, reach, {"language"}, device="cuda", free_bytes=10**12,
                        host_free_bytes=10**12)
    vectors = sum(whole.task_vector_bytes.values())
    assert (whole.vectors_on, whole.pristine_on) == ("device", "device")
    assert whole.device_bytes == whole.held_bytes and whole.host_bytes == whole.largest_donor_bytes

    def plan(free: int, **kw):
        return plan_memory(layout, reach, {"language"}, device="cuda", free_bytes=free,
                           host_free_bytes=10**12, **kw)

    short = plan(whole.held_bytes - 1)  # the task vectors go to the host first
    assert (short.vectors_on, short.pristine_on) == ("host", "device")
    assert short.device_bytes == whole.held_bytes - vectors
    shorter = plan(whole.model_bytes + 1)  # then the base copies too
    assert (shorter.vectors_on, shorter.pristine_on) == ("host", "host")
    assert shorter.device_bytes == whole.model_bytes
    assert shorter.host_bytes == whole.held_bytes - whole.model_bytes + whole.largest_donor_bytes
    shorter.check()
    with pytest.raises(ConfigError, match=r"needs .* on cuda \(model"):
        plan(whole.model_bytes - 1).check()  # not even the live model fits
    forced = plan(10**12, placement="host")
    assert (forced.vectors_on, forced.pristine_on) == ("host", "host")
    with pytest.raises(ConfigError, match="of host memory beside cuda"):
        plan_memory(layout, reach, {"language"}, device="cuda", free_bytes=10**12,
                    host_free_bytes=1000, placement="host").check()
    with pytest.raises(ConfigError, match="memory_placement: host cannot change anything on "
                                          "the CPU"):
        plan_memory(layout, reach, {"language"}, device="cpu", free_bytes=10**12,
                    placement="host")
    assert "task vector vqa" in shorter.describe() and "host" in shorter.describe()


def test_a_streamed_donor_plans_its_largest_tensor_not_the_whole_model(folders, tmp_path):
    from vlmexp.merge.plan import SLAB_ELEMENTS, donor_reading_bytes
    from vlmexp.streamed import open_streamed

    streamed, _ = open_streamed(folders["vqa"])
    largest = max(t.nbytes for t in streamed.tensors.values())
    numel = largest // 2  # bf16
    assert donor_reading_bytes(folders["vqa"]) == largest + 12 * min(numel, SLAB_ELEMENTS)
    whole = sum(p.numel() * p.element_size() for p in model_skeleton(folders["vqa"]).parameters())
    # one transformers must open (here: stored in another dtype than its config's) counts whole
    import shutil

    cast = tmp_path / "cast"
    shutil.copytree(folders["vqa"], cast)
    cfg = json.loads((cast / "config.json").read_text())
    cfg["dtype"] = "float32"
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict):
            cfg[sub]["dtype"] = "float32"
    (cast / "config.json").write_text(json.dumps(cfg))
    assert open_streamed(cast)[0] is None
    assert donor_reading_bytes(str(cast)) == 2 * whole  # float32 of a bf16 model


def test_inspect_plans_for_a_gpu_this_machine_lacks(folders, capsys):
    assert main(["inspect", folders["base"], folders["vqa"], folders["text"], "--plan",
                 "--components", "language", "--device", "cuda", "--memory-budget", "80GB",
                 "--host-memory", "64GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vectors_on"] == "device" and out["free_bytes"] == 80 * 10**9
    assert out["host_free_bytes"] == 64 * 10**9
    assert main(["inspect", folders["base"], folders["vqa"], "--placement", "host"]) == 2
    assert "--placement goes with --plan" in capsys.readouterr().err
