"""Memory at real scale, against the memory plan (not a test). Prints ratios from this one run.

1. Builds (once, cached under `.vlmexp_cache/bench/memory/`) three synthetic checkpoints with
   Qwen2-VL-2B's tensor shapes: the whole model (a 32-block vision tower of width 1280, 28
   decoder layers of width 1536 with an 8960-wide MLP, 12 heads and 2 KV heads, a tied
   151,936-token vocabulary), random bf16 weights, saved as transformers saves them (sharded
   safetensors), with a locally trained byte-level BPE tokenizer and Qwen2-VL's processor kind.
   The two donors are the base plus noise.
2. `vlmexp merge` of a language-only task-arithmetic recipe with both donors, in a subprocess:
   its peak resident memory against the base model's bytes (the issue's goal: at most 3.5×).
3. A 5-trial `vlmexp search` over the language model's weights for both donors (8 image-text
   items per trial), in a subprocess: its peak resident memory against the plan it printed
   (goal: within 10%). The plan counts the engine; the process's own libraries and the
   evaluation are the difference.
4. The plan alone (no weights exist) for LLaVA-1.5-7B-shaped models with 3 donors, searching
   the language model, projector and vision tower, on an 80 GB GPU: it must fit.

    python benchmarks/memory.py [--trials 5] [--items 8] [--skip-search] [--skip-merge]

Run it alone: it needs about 15 GB of memory and 14 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".vlmexp_cache" / "bench" / "memory"
GiB = 2**30

# Qwen2-VL-2B-Instruct's config.json (text and vision widths)
QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                        max_position_embeddings=32768, rope_theta=1000000.0,
                        tie_word_embeddings=True,
                        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                          in_channels=3)


def build_checkpoints(out: Path) -> dict[str, Path]:
    """base, donor_a, donor_b: Qwen2-VL-2B-shaped, random bf16, saved once."""
    import transformers as tf
    from transformers import Qwen2VLImageProcessorPil

    from vlmexp.checkpoint import save_model
    from vlmexp.zoo.tiny import TOKEN_KEYWORDS
    from vlmexp.zoo.tiny_processors import for_tokenizer
    from vlmexp.zoo.tokenizers import build_tokenizer

    folders = {role: out / role for role in ("base", "donor_a", "donor_b")}
    tokenizer = build_tokenizer("qwen2", chat_template=True)
    processor = for_tokenizer("qwen2", tokenizer)
    # Qwen2-VL's own patching (14-pixel patches, 2x2 merge, 2 frames); 112x112 images: 64
    # patches, 16 image tokens
    processor.image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 112 * 112, "longest_edge": 112 * 112})
    if all((f / "config.json").is_file() for f in folders.values()):
        for folder in folders.values():
            processor.save_pretrained(str(folder))
        return folders
    ids = {key: tokenizer.convert_tokens_to_ids(token)
           for key, token in TOKEN_KEYWORDS["qwen2_vl"].items()}
    config = tf.Qwen2VLConfig(
        text_config=dict(QWEN2_VL_2B_TEXT), vision_config=dict(QWEN2_VL_2B_VISION),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = tf.Qwen2VLForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.tie_weights()  # to_empty gives the tied head a tensor of its own
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    # (non-persistent buffers, rotary frequencies, are not saved: transformers makes them)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"building Qwen2-VL-2B-shaped checkpoints ({billions:.2f}B parameters, bf16) in {out}",
          file=sys.stderr)
    for role, folder in folders.items():
        if role != "base":  # a donor: the previous model plus noise
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=generator, dtype=torch.bfloat16)
                          * 0.002)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp, processor=processor, force=True)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        print(f"  {role}: {folder_bytes(folder) / GiB:.2f} GiB", file=sys.stderr)
    return folders


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def write_config(out: Path, folders: dict[str, Path], items: int) -> Path:
    """A conf/ folder: the project's, with models, space and eval for this benchmark."""
    conf = out / "conf"
    shutil.rmtree(conf, ignore_errors=True)
    shutil.copytree(ROOT / "conf", conf)
    (conf / "models" / "memory.yaml").write_text(json.dumps({
        "base": str(folders["base"]),
        "donors": {"a": {"path": str(folders["donor_a"])}, "b": {"path": str(folders["donor_b"])}},
        "zoo_dir": None, "trust_remote_code": False, "allow_pickle": False}))
    (conf / "space" / "memory.yaml").write_text(json.dumps({
        "components": {"language": {"a": {"weight": [0.0, 1.0]}, "b": {"weight": [0.0, 1.0]}}},
        "parameters": {}, "knots": {}, "methods": [], "pin": [], "take": {}, "tie": [],
        "shared": False}))
    task = out / "task.yaml"
    task.write_text(json.dumps({
        "task": "bench_color_shape", "version": 1, "kind": "image_choice",
        "source": {"type": "jsonl", "path": str(ROOT / "evals/demo/color_shape_val.jsonl")},
        "prompt": "{question}", "subset": {"size": items, "seed": 0}}))
    (conf / "eval" / "memory.yaml").write_text(json.dumps({
        "tasks": [str(task)], "objectives": {"vl": {"bench_color_shape": 1.0}},
        "test_tasks": [str(task)], "test_objectives": {"vl": {"bench_color_shape": 1.0}},
        "batch_size": 4}))
    return conf


# runs `python -m vlmexp ARGS` and prints the process's peak resident memory when it ends
_PEAK = ("import runpy, sys\n"
         "sys.argv = ['vlmexp'] + sys.argv[1:]\n"
         "try:\n"
         "    runpy.run_module('vlmexp', run_name='__main__')\n"
         "finally:\n"
         "    peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
         "    print('PEAK_KB', peak[0].split()[1], file=sys.stderr)\n")


def run_peak(args: list[str], cwd: Path) -> tuple[int, str, float]:
    """Run `python -m vlmexp ARGS`: its peak resident memory (bytes, the kernel's VmHWM at its
    end), its stderr and its seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"vlmexp {' '.join(args[:2])} … failed:\n{proc.stderr[-3000:]}")
    peak = re.search(r"^PEAK_KB (\d+)$", proc.stderr, re.M)
    return int(peak.group(1)) * 1024, proc.stderr, seconds


def plan_peak(stderr: str) -> int:
    """The peak the printed memory plan names (two decimals, in its unit)."""
    match = re.search(r"^\s*peak\s+([\d.]+) (GiB|MiB|KiB|B)", stderr, re.M)
    if not match:
        sys.exit("no memory plan in the output")
    units = {"GiB": GiB, "MiB": 2**20, "KiB": 2**10, "B": 1}
    return int(float(match.group(1)) * units[match.group(2)])


def merge_case(folders: dict[str, Path], work: Path) -> None:
    from vlmexp.merge.recipe import Recipe

    recipe = Recipe.from_dict({
        "method": "task_arithmetic", "base": {"path": str(folders["base"])},
        "donors": [{"name": "a", "path": str(folders["donor_a"])},
                   {"name": "b", "path": str(folders["donor_b"])}],
        "components": {"language": {"a": {"weight": 0.5}, "b": {"weight": 0.3}}},
        "dtype": "float32"})
    path = work / "recipe.yaml"
    recipe.save(path)
    out = work / "merged"
    shutil.rmtree(out, ignore_errors=True)
    peak, _, seconds = run_peak(["merge", str(path), "--out", str(out), "--device", "cpu"], work)
    shutil.rmtree(out, ignore_errors=True)
    model = folder_bytes(folders["base"])
    print(f"merge, language only, 2 donors: peak {peak / GiB:.2f} GiB = "
          f"{peak / model:.2f}× the model's {model / GiB:.2f} GiB (goal <= 3.5×; {seconds:.0f} s)")


def search_case(folders: dict[str, Path], work: Path, trials: int, items: int) -> None:
    conf = write_config(work, folders, items)
    for f in ("optuna.db", "mlflow.db"):
        (work / f).unlink(missing_ok=True)
    shutil.rmtree(work / "mlruns", ignore_errors=True)
    peak, stderr, seconds = run_peak(
        ["search", "--config-dir", str(conf), "--no-progress",
         "models=memory", "space=memory", "eval=memory", "device=cpu", "study_name=memory",
         "search.objectives=[vl]",
         f"search.n_trials={trials}", "search.baselines=false", "search.pruning.enabled=false",
         f"search.storage=sqlite:///{work / 'optuna.db'}",
         f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.log_items=false"], work)
    planned = plan_peak(stderr)
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("memory plan"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")),
               len(lines))
    print("\n".join(lines[start:end]))
    import optuna

    trials = optuna.load_study(study_name="memory",
                               storage=f"sqlite:///{work / 'optuna.db'}").trials
    failed = [t for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
    if failed:
        sys.exit(f"{len(failed)} trials did not complete: "
                 f"{failed[0].user_attrs or failed[0].system_attrs}\n{stderr[-2000:]}")
    print(f"search, {len(trials)} trials x {items} items, language only, 2 donors: peak "
          f"{peak / GiB:.2f} GiB against the plan's {planned / GiB:.2f} GiB: "
          f"{(peak - planned) / planned:+.1%} (goal within 10%; {seconds:.0f} s)")


def llava_7b_plan() -> None:
    """The plan for LLaVA-1.5-7B-shaped models with 3 donors on an 80 GB GPU (no weights)."""
    import transformers as tf
    from merge_speed import llava_7b_config  # beside this script

    from vlmexp.layout import discover
    from vlmexp.merge.plan import SLAB_ELEMENTS, plan_memory

    config = llava_7b_config()
    config.dtype = torch.float16
    with torch.device("meta"):
        model = tf.LlavaForConditionalGeneration(config).to(torch.float16)
    layout = discover(model)
    billions = sum(p.numel for p in layout.params.values()) / 1e9
    largest = max(p.nbytes for p in layout.params.values())
    reading = largest + 12 * min(largest // 2, SLAB_ELEMENTS)
    components = {"vision", "projector", "language"}
    reach = {f"donor{i}": set(components) for i in range(3)}
    plan = plan_memory(layout, reach, components, device="cuda", free_bytes=80 * 10**9,
                       host_free_bytes=200 * 10**9,
                       donor_bytes={d: reading for d in reach})
    print(f"LLaVA-1.5-7B-shaped ({billions:.2f}B parameters, fp16), 3 donors, vision + projector "
          f"+ language searched, an 80 GB GPU and 200 GB of host memory:")
    print(plan.describe())
    plan.check()
    print(f"fits: {plan.device_bytes / 1e9:.1f} GB on the GPU of 80 "
          f"(task vectors on the {plan.vectors_on}, base copies on the {plan.pristine_on})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-merge", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs", file=sys.stderr)
    folders = build_checkpoints(CACHE / "qwen2vl-2b")
    work = CACHE / "work"
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_merge:
        merge_case(folders, work)
    if not args.skip_search:
        search_case(folders, work, args.trials, args.items)
    llava_7b_plan()


if __name__ == "__main__":
    main()
