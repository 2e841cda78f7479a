"""GPU check: the engine and the scorer on cuda agree with the CPU, and are deterministic there.

Run on a machine with a CUDA GPU (CI has none; this is the one script the device check runs):

    python benchmarks/gpu_check.py [--zoo DIR]

It prints, from this one run:

1. per merge method, on a tiny LLaVA with a fine-tuned relative and an LLM donor: the max abs
   difference between the cuda and cpu merges (DARE and DELLA included: their masks come from
   the counter-based stream, the same bits on both), whether the per-component fingerprints of
   the two agree within `merge.fingerprint.TOLERANCE` (what `reproduce` accepts where the exact
   digest differs), and whether the weights digest is repeatable on cuda (same recipe after
   another one in between);
2. that a non-finite merged tensor is refused on cuda, naming the tensor; and, for bf16
   models with task vectors and base copies in pinned host memory, the same agreement;
3. the masks themselves: the counter stream's bits, DARE and DELLA masks and magnitude top-k
   masks from a cached histogram, cuda against cpu, bit for bit;
4. with `--zoo`, the demo zoo's colour/shape validation task scored on cuda and on cpu: accuracy
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
    from vlmexp.merge.fingerprint import compare, tolerance_for
    from vlmexp.merge.recipe import Recipe
    from vlmexp.zoo.tiny import llava_family

    fam = llava_family()
    cpu, gpu = engines(fam)
    print("1. methods: cuda against cpu")
    other = method_recipe("linear")
    for name in methods.METHODS:
        recipe = method_recipe(name)
        rc = cpu.apply(recipe)
        rg = gpu.apply(recipe)
        live_c = dict(cpu.model.named_parameters())
        live_g = dict(gpu.model.named_parameters())
        diff = max((live_g[k].detach().cpu() - v.detach()).abs().max().item()
                   for k, v in live_c.items())
        check(diff <= 1e-5, f"{name:<18} max |cuda - cpu| = {diff:.2e}")
        tolerance = tolerance_for({t.dtype for t in live_c.values()})
        prints = compare(rc.fingerprints, rg.fingerprints, tolerance=tolerance)
        same = "same digest" if rc.weights_digest == rg.weights_digest else "digests differ"
        check(prints.agree, f"{name:<18} fingerprints cuda vs cpu: {prints.why} ({same})")
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


def placement_checks() -> None:
    """bf16 models, task vectors and base copies in the host's pinned memory (the plan's
    placement when the GPU is short): the GPU's multi-tensor path against the CPU kernels."""
    from vlmexp.merge.engine import MergeEngine
    from vlmexp.merge.fingerprint import compare, tolerance_for
    from vlmexp.zoo.tiny import llava_family

    print("1b. bf16, task vectors and base copies on the host, cuda against cpu")
    fam = {k: v.to(torch.bfloat16) for k, v in llava_family().items()}
    donors = {"vqa": fam["vqa"], "text": fam["text"]}
    cpu = MergeEngine(copy.deepcopy(fam["base"]), copy.deepcopy(donors), device="cpu",
                      progress=False)
    host = MergeEngine(copy.deepcopy(fam["base"]), copy.deepcopy(donors), device=DEVICE,
                       progress=False, vectors_on="host", pristine_on="host")
    pinned = all(t.is_pinned() for tvs in host.task_vectors.values() for t in tvs.values())
    check(pinned or DEVICE == "cpu", "task vectors in pinned host memory")
    for name in ("task_arithmetic", "linear", "slerp", "ties", "dare_ties"):
        recipe = method_recipe(name)
        rc, rg = cpu.apply(recipe), host.apply(recipe)
        prints = compare(rc.fingerprints, rg.fingerprints, tolerance=tolerance_for([
            torch.bfloat16]))
        check(prints.agree, f"{name:<18} bf16 from the host: {prints.why}")


def mask_checks() -> None:
    from vlmexp.merge import sparsify as sp

    print("3. masks: cuda bits against cpu bits")
    stream = sp.CounterStream.of(3, "model.language_model.layers.0.mlp.up_proj.weight", "vqa")
    n = 3 * sp._STREAM_CHUNK_GPU + 11  # several device chunks and a ragged end
    check(torch.equal(stream.bits(0, n, DEVICE).cpu(), stream.bits(0, n)),
          f"counter stream: {n} 64-bit numbers identical")
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(2048, 1536, generator=g) * 0.01
    dev = delta.to(DEVICE)
    for density in (0.1, 0.5, 0.9):
        same = torch.equal(sp.random_mask(dev, density, stream).cpu(),
                           sp.random_mask(delta, density, stream))
        check(same, f"DARE mask, density {density}: identical")
        della = 0.2 + density * 0.6  # density ± epsilon inside (0, 1)
        same = torch.equal(sp.rank_magnitude_sampling_mask(dev, della, 0.15, stream).cpu(),
                           sp.rank_magnitude_sampling_mask(delta, della, 0.15, stream))
        check(same, f"DELLA mask, density {della:.2f}: identical")
    hist = sp.MagnitudeHistogram.of(dev)
    check(hist == sp.MagnitudeHistogram.of(delta), "magnitude histogram identical")
    for density in (0.05, 0.37, 0.8):
        same = torch.equal(sp.magnitude_mask(dev, density, hist).cpu(),
                           sp.magnitude_mask(delta, density))
        check(same, f"top-k mask from the cached histogram, density {density}: identical")


def zoo_checks(zoo: Path) -> None:
    from transformers import AutoProcessor

    from vlmexp.checkpoint import open_model
    from vlmexp.eval.evaluator import Evaluator
    from vlmexp.eval.tasks import load_tasks

    print("4. demo zoo scorer: cuda against cpu")
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
    placement_checks()
    mask_checks()
    if args.zoo:
        zoo_checks(args.zoo)
    print(f"{len(FAILED)} failed" + (": " + "; ".join(FAILED) if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
