"""GPU check: the engine and the scorer on cuda agree with the CPU, and are deterministic there.

Run on a machine with a CUDA GPU (CI has none; this is the one script the device check runs):

    python benchmarks/gpu_check.py [--zoo DIR]

It prints, from this one run:

1. per merge method, on a tiny LLaVA with a fine-tuned relative and an LLM donor: the max abs
   difference between the cuda and cpu merges (deterministic methods; random ones draw from the
   device's generator, so only their kept fraction is compared), and whether the weights digest
   is repeatable on cuda (same recipe after another one in between);
2. that a non-finite merged tensor is refused on cuda, naming the tensor;
3. with `--zoo`, the demo zoo's colour/shape validation task scored on cuda and on cpu: accuracy
   both ways and the max difference in summed answer log-probs.

Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAILED: list[str] = []
DEVICE = "cuda"


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        FAILED.append(what)


def method_recipe(name: str):
    from vlmexp.merge import methods
    from vlmexp.merge.recipe import Recipe

    spec = methods.get_spec(name)
    donors = ["vqa", "text"][: spec.max_donors or 2]
    if len(donors) < spec.min_donors:
        raise SystemExit(f"{name}: needs {spec.min_donors} donors")
    values = {"weight": [0.7, 0.4], "density": [0.5, 0.6], "t": [0.4, 0.4]}
    per_donor = {
        d: {p.name: values[p.name][i] for p in spec.donor_params if p.name in values}
        for i, d in enumerate(donors)
    }
    comps = {c: {d: per_donor[d] for d in donors if d == "vqa" or c in ("language", "head")}
             for c in ("vision", "projector", "language", "head")}
    comps = {c: per for c, per in comps.items() if len(per) >= spec.min_donors}
    return Recipe.from_dict({"method": name, "base": {"path": "base"},
                             "donors": [{"name": d, "path": d} for d in donors],
                             "components": comps, "seed": 3})


def engines(fam):
    from vlmexp.merge.engine import MergeEngine

    donors = {"vqa": fam["vqa"], "text": fam["text"]}
    cpu = MergeEngine(copy.deepcopy(fam["base"]), copy.deepcopy(donors), device="cpu",
                      progress=False)
    gpu = MergeEngine(copy.deepcopy(fam["base"]), copy.deepcopy(donors), device=DEVICE,
                      progress=False)
    return cpu, gpu


def merge_checks() -> None:
    from vlmexp.errors import MergeError
    from vlmexp.merge import methods
    from vlmexp.merge.engine import MergeEngine
    from vlmexp.merge.recipe import Recipe
    from vlmexp.zoo.tiny import llava_family

    fam = llava_family()
    cpu, gpu = engines(fam)
    print("1. methods: cuda against cpu")
    other = method_recipe("linear")
    for name, spec in methods.METHODS.items():
        recipe = method_recipe(name)
        rc = cpu.apply(recipe)
        rg = gpu.apply(recipe)
        live_c = dict(cpu.model.named_parameters())
        live_g = dict(gpu.model.named_parameters())
        diff = max((live_g[k].detach().cpu() - v.detach()).abs().max().item()
                   for k, v in live_c.items())
        if spec.random:
            base = dict(fam["base"].named_parameters())
            kept = [
                ((live_c[k].detach() != base[k].detach()).float().mean().item(),
                 (live_g[k].detach().cpu() != base[k].detach()).float().mean().item())
                for k in live_c if live_c[k].numel() >= 4096
            ]
            worst = max(abs(a - b) for a, b in kept)
            check(worst < 0.03, f"{name:<18} random: changed fraction cuda vs cpu within {worst:.3f}")
        else:
            check(diff <= 1e-5, f"{name:<18} max |cuda - cpu| = {diff:.2e}")
        gpu.apply(other)
        again = gpu.apply(recipe)
        check(again.weights_digest == rg.weights_digest,
              f"{name:<18} cuda digest repeatable ({rg.weights_digest[:12]})")
        del rc
    print("2. non-finite merged tensor on cuda")
    bad = copy.deepcopy(fam["vqa"])
    with torch.no_grad():
        bad.model.multi_modal_projector.linear_2.bias[0] = float("inf")
    eng = MergeEngine(copy.deepcopy(fam["base"]), {"vqa": bad}, device=DEVICE, progress=False)
    before = eng.weights_digest()
    r = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
                          "donors": [{"name": "vqa", "path": "v"}],
                          "components": {"projector": {"vqa": {"weight": 0.5}}}})
    try:
        eng.apply(r)
        check(False, "inf in a merged tensor is refused")
    except MergeError as err:
        check("multi_modal_projector.linear_2.bias" in str(err), f"refused: {err}")
    check(eng.weights_digest() == before, "model reset to the base after the refusal")


def zoo_checks(zoo: Path) -> None:
    from transformers import AutoProcessor

    from vlmexp.checkpoint import open_model
    from vlmexp.eval.evaluator import Evaluator
    from vlmexp.eval.tasks import load_tasks

    print("3. demo zoo scorer: cuda against cpu")
    folder = next(p.parent for p in zoo.rglob("zoo.json"))
    processor = AutoProcessor.from_pretrained(folder / "vqa-expert")
    tasks = load_tasks([Path("evals/demo/color_shape_val.yaml")])
    out = {}
    for device in ("cpu", DEVICE):
        model = open_model(folder / "vqa-expert", device=device).model
        ev = Evaluator(tasks, {"vl": {tasks[0].name: 1.0}}, processor, device=device)
        ev.evaluate(model, stop=4)
        t0 = time.perf_counter()
        res = ev.evaluate(model)
        out[device] = (res, time.perf_counter() - t0)
        print(f"  {device}: vl {res.objectives['vl']:.3f} in {out[device][1]:.2f} s")
    (rc, _), (rg, _) = out["cpu"], out[DEVICE]
    name = tasks[0].name
    diff = max(abs(a - b) for ic, ig in zip(rc.items[name], rg.items[name], strict=True)
               for a, b in zip(ic.scores, ig.scores, strict=True))
    check(rc.objectives["vl"] == rg.objectives["vl"], "same accuracy on cuda and cpu")
    check(diff < 1e-3, f"answer log-probs agree within {diff:.1e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, help="a built demo zoo folder (e.g. .vlmexp_cache/zoo)")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else DEVICE}")
    merge_checks()
    if args.zoo:
        zoo_checks(args.zoo)
    print(f"{len(FAILED)} failed" + (": " + "; ".join(FAILED) if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
