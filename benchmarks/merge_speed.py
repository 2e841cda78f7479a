"""Merge speed: `MergeEngine.apply` against the memory bandwidth bound, and against mergekit's route.

Builds a synthetic LLaVA-shaped model (about 280M parameters by default, in --dtype) and two
donors (the base plus seeded noise), then prints, from this one run:

1. copy bandwidth (1 GiB float32 tensors), measured beside every timing, best seen;
2. for task_arithmetic, ties (masks cached) and slerp: the apply time and its fraction of the
   bandwidth bound = (bytes the merge must read and write) / bandwidth, the bytes counted in the
   dtypes the engine actually holds: the model's (written, and the pristine base read), the task
   vectors' (printed: float32, or the model's dtype), one byte per entry of each TIES mask;
3. recipe → evaluable in-memory model: vlmexp's apply against mergekit's route (`mergekit-yaml`
   to a folder, then `from_pretrained`) for the same task_arithmetic recipe.

Goals: float32 (issue 3): task_arithmetic >= 80 %, ties >= 40 %, slerp >= 30 % of the bound;
>= 60x faster than mergekit's route. bfloat16 / float16 (issue 14): task_arithmetic and slerp
>= 60 %, ties >= 30 %. Not a test: these machines are noisy, so compare within one run.

GPU (issue 14): `--device cuda --shape llava-7b --dtype float16`, the multi-tensor path; goals
task_arithmetic and slerp >= 50 %, ties (masks cached) >= 25 % of the device's copy bandwidth.
`--fused foreach` runs that path on the CPU too.

Usage:
    python benchmarks/merge_speed.py [--scale 1.0] [--layers 12] [--dtype bfloat16]
        [--repeats 5] [--skip-mergekit] [--device cuda] [--shape llava-7b] [--copy-mib 1024]
        [--fused foreach]
    (a smoke run: --scale 0.125 --layers 1 --repeats 2 --copy-mib 64 --skip-mergekit)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llava_shaped(scale: float, layers: int = 12,
                 dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A LLaVA with CLIP-B-like vision and a 1024-wide Llama, 12 layers each (about 280M
    parameters); `scale` narrows the Llama, `layers` sets both towers' depth."""
    import transformers as tf

    width = int(1024 * scale) // 64 * 64
    cfg = tf.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=layers, num_attention_heads=12, image_size=224,
                           patch_size=16, projection_dim=768),
        text_config=dict(model_type="llama", vocab_size=32000, hidden_size=width,
                         intermediate_size=int(width * 2.75), num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16),
        image_token_index=31999, vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return tf.LlavaForConditionalGeneration(cfg).eval().to(dtype)


def llava_7b_config():
    """LLaVA-1.5-7B's config.json shapes: a CLIP-L/336 vision tower and a 32-layer, 4096-wide
    Llama (7.06B parameters); also benchmarks/memory.py's 7B plan."""
    import transformers as tf

    return tf.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024,
                           intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768),
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096,
                         intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        image_token_index=32000)


def llava_7b(device: str, dtype: torch.dtype) -> torch.nn.Module:
    """LLaVA-1.5-7B's shapes, random, built directly on `device` (a GPU: 14 GB in fp16)."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.LlavaForConditionalGeneration(llava_7b_config())
    model = model.to_empty(device=device).to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model


def noisy_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype), alpha=0.01)
    return other


class Bandwidth:
    """Bytes per second of `dst.copy_(src)` (read + write counted) on 1 GiB float32 tensors
    (`mib` MiB for a smoke run).

    Measured again beside every timing (these machines share their memory bus with others, so
    a figure from minutes earlier may not hold); the best seen so far is the one used.
    """

    def __init__(self, device: str = "cpu", mib: int = 1024) -> None:
        self.device = device
        self.src = torch.randn(mib << 18, device=device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)
        self.best = 0.0

    def sample(self) -> float:
        seconds = _timed(lambda: self.dst.copy_(self.src), self.device)
        self.best = max(self.best, 2 * self.src.numel() * 4 / seconds)
        return self.best


def _timed(fn, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def recipe_dict(method: str, base: str, donors: list[str]) -> dict:
    comps = ("vision", "projector", "language", "embed", "head")
    if method == "slerp":
        per = {c: {"d1": {"t": 0.4}} for c in comps}
        donors = donors[:1]
    elif method == "ties":
        per = {c: {"d1": {"weight": 0.7, "density": 0.5}, "d2": {"weight": 0.4, "density": 0.5}}
               for c in comps}
    else:
        per = {c: {"d1": {"weight": 0.7}, "d2": {"weight": 0.4}} for c in comps}
    return {"vlmexp_recipe": 1, "method": method, "base": {"path": base},
            "donors": [{"name": f"d{i + 1}", "path": p} for i, p in enumerate(donors)],
            "components": per}


def bytes_moved(engine, method: str) -> int:
    """Bytes an apply of `method` (recipe_dict's: every tensor, donors d1 and d2, slerp d1 only)
    must read and write, in the dtypes the engine holds: each merged tensor written once, its
    pristine base and each donor's task vector read once, and a TIES mask byte per donor."""
    donors = ["d1"] if method == "slerp" else ["d1", "d2"]
    pristine = getattr(engine, "_base", {})  # the engine's pristine copy, where it keeps one
    total = 0
    for name, param in engine.state_dict_view().items():
        vectors = [engine.task_vectors[d][name] for d in donors if name in engine.task_vectors[d]]
        if not vectors:
            continue
        base = pristine.get(name, param)
        total += param.numel() * (param.element_size() + base.element_size()
                                  + sum(v.element_size() for v in vectors)
                                  + (len(vectors) if method == "ties" else 0))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="language model width factor")
    ap.add_argument("--layers", type=int, default=12, help="layers of each tower")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the models' dtype (the merge math is float32 either way)")
    ap.add_argument("--copy-mib", type=int, default=1024,
                    help="size of the tensors the copy bandwidth is measured on")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--device", default="cpu", help="where the engine merges (cpu or cuda)")
    ap.add_argument("--shape", default="llava-280m", choices=("llava-280m", "llava-7b"),
                    help="llava-7b: LLaVA-1.5-7B's shapes, built on --device (a GPU's job)")
    ap.add_argument("--fused", default="auto", choices=("auto", "foreach"),
                    help="the engine's weighted-sum path (foreach: the GPU's, on any device)")
    args = ap.parse_args()

    from vlmexp.merge.engine import MergeEngine
    from vlmexp.merge.recipe import Recipe

    threads = torch.get_num_threads()
    if args.shape == "llava-7b":
        base = llava_7b(args.device, getattr(torch, args.dtype))
    else:
        base = llava_shaped(args.scale, args.layers, getattr(torch, args.dtype))
    n = sum(p.numel() for p in base.parameters())
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"model: {n / 1e6:.0f}M {args.dtype} parameters ({args.shape}), {threads} threads, "
          f"device {args.device} ({name}), fused {args.fused}")
    d1, d2 = noisy_copy(base, 1), noisy_copy(base, 2)
    bw = Bandwidth(args.device, args.copy_mib)
    engine = MergeEngine(base, {"d1": d1, "d2": d2}, device=args.device, progress=False,
                         fused=args.fused)
    if args.device != "cpu":  # mergekit's route (CPU only) needs them; a GPU needs the room
        d1 = d2 = None
    stored = sorted({str(v.dtype).removeprefix("torch.")
                     for vectors in engine.task_vectors.values() for v in vectors.values()})
    print(f"task vectors stored in {', '.join(stored)}")

    methods = ("task_arithmetic", "ties", "slerp")
    must_move = {m: bytes_moved(engine, m) for m in methods}
    goals = ({"task_arithmetic": 0.50, "ties": 0.25, "slerp": 0.50}
             if args.device.startswith("cuda") else
             {"task_arithmetic": 0.80, "ties": 0.40, "slerp": 0.30} if args.dtype == "float32"
             else {"task_arithmetic": 0.60, "ties": 0.30, "slerp": 0.60})
    recipes = {m: Recipe.from_dict(recipe_dict(m, "base", ["d1", "d2"])) for m in methods}
    first = {m: engine.apply(recipes[m]) for m in methods}  # ties: computes and caches its masks
    # round-robin, so that every method is timed across the whole run (a machine that is slow
    # for a second, as right after the model's memory was first touched, costs all alike)
    runs: dict[str, list] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            bw.sample()
            runs[m].append(engine.apply(recipes[m]))
    bw.sample()
    rows = []
    for m in methods:
        assert all(r.weights_digest == first[m].weights_digest for r in runs[m])
        rows.append((m, min(r.seconds for r in runs[m]), min(r.digest_seconds for r in runs[m])))
    # one bandwidth for every row: the best seen in the whole run (the conservative bound)
    print(f"{'method':<16}{'apply s':>9}{'bound s':>9}{'of bound':>10}{'goal':>7}"
          f"{'digest s':>10}{'GB moved':>10}")
    for method, best, digest in rows:
        bound = must_move[method] / bw.best
        print(f"{method:<16}{best:>9.3f}{bound:>9.3f}{bound / best:>9.0%}"
              f"{goals[method]:>7.0%}{digest:>10.3f}{must_move[method] / 1e9:>10.3f}")
    print(f"copy bandwidth: {bw.best / 1e9:.1f} GB/s (best seen; read + write, "
          f"{args.copy_mib} MiB float32 tensors)")
    del bw
    apply_s = min(engine.apply(Recipe.from_dict(recipe_dict("task_arithmetic", "base",
                                                            ["d1", "d2"]))).seconds
                  for _ in range(args.repeats))
    # mergekit-yaml beside this interpreter (a venv run without activating it), else on PATH
    beside = Path(sys.executable).parent / "mergekit-yaml"
    mergekit_yaml = str(beside) if beside.exists() else shutil.which("mergekit-yaml")
    if args.skip_mergekit or args.device != "cpu" or mergekit_yaml is None:
        why = ("--skip-mergekit" if args.skip_mergekit else
               "mergekit runs on the CPU" if args.device != "cpu" else
               "mergekit-yaml not found: ./setup.sh dev installs it")
        print(f"mergekit route: skipped ({why})")
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the figures, not shard-writing bars
    tmp = Path(tempfile.mkdtemp(prefix="merge_speed-"))
    try:
        for name, model in (("base", engine.model), ("d1", d1), ("d2", d2)):
            if name == "base":
                engine.reset()
            model.save_pretrained(tmp / name, save_original_format=False)
        del d1, d2
        from vlmexp.merge.export import mergekit_config

        recipe = Recipe.from_dict(recipe_dict("task_arithmetic", str(tmp / "base"),
                                              [str(tmp / "d1"), str(tmp / "d2")]))
        (tmp / "mk.yaml").write_text(yaml.safe_dump(mergekit_config(recipe)))
        from transformers import AutoModelForImageTextToText

        t0 = time.perf_counter()
        subprocess.run([mergekit_yaml, str(tmp / "mk.yaml"), str(tmp / "out")], check=True,
                       capture_output=True)
        t1 = time.perf_counter()
        AutoModelForImageTextToText.from_pretrained(tmp / "out")
        t2 = time.perf_counter()
        route = t2 - t0
        print(f"mergekit route: mergekit-yaml {t1 - t0:.2f} s + from_pretrained {t2 - t1:.2f} s"
              f" = {route:.2f} s; vlmexp apply {apply_s:.3f} s; {route / apply_s:.0f}x faster"
              f" (goal 60x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
