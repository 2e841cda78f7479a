"""Shared fixtures: tiny models are built once per test session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # two cores: tiny forwards are far slower under thread contention


@pytest.fixture(scope="session")
def tiny():
    """`tiny(name)` returns the session's tiny random model `name` (see vlmexp.zoo.tiny.BUILDERS).

    The same object is returned on every call: tests must not modify it (deep-copy first).
    """
    from vlmexp.zoo.tiny import build

    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_processor():
    """`tiny_processor(name)` returns the session's tiny processor for the tiny VLM `name`."""
    from vlmexp.zoo.tiny_processors import build_processor

    cache: dict[str, object] = {}

    def get(name: str) -> object:
        if name not in cache:
            cache[name] = build_processor(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def kind_processor():
    """`kind_processor(kind, tokenizer)`: the processor of the tiny VLM that a real tokenizer kind
    (vlmexp.zoo.tokenizers) belongs to, with that tokenizer and its chat template."""
    from vlmexp.zoo.tiny_processors import for_tokenizer

    return for_tokenizer


@pytest.fixture(scope="session")
def demo_zoo(tmp_path_factory):
    """The full demo zoo (`vlmexp.zoo.build.ZooPaths`), built once per session (about two
    minutes on two cores) under `$VLMEXP_ZOO_DIR` when set (reused when already there), else in a
    temporary folder."""
    from vlmexp.zoo.build import ENV_DIR, ensure_zoo

    root = os.environ.get(ENV_DIR) or tmp_path_factory.mktemp("zoo")
    return ensure_zoo(root, progress=False)


@pytest.fixture(scope="session")
def demo_study(tmp_path_factory, demo_zoo):
    """A short demo study run as a user runs it (`python -m vlmexp search`, 12 trials, the
    baselines first) in a folder of its own: `mlflow.db`, `mlruns/` and `optuna.db` are there.
    Returns that folder."""
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path_factory.mktemp("demo_study")
    root = Path(__file__).resolve().parent.parent
    # the zoo where a user's demo has it, so that recipes name it as theirs do (relative paths)
    (folder / ".vlmexp_cache").mkdir()
    (folder / ".vlmexp_cache" / "zoo").symlink_to(demo_zoo.root.parent, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "VLMEXP_ZOO_DIR"}
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "vlmexp", "search", "search.n_trials=12", "threads=1",
         "--no-progress"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder / "search.out").write_text(done.stdout)  # the demo table as printed
    return folder


@pytest.fixture(scope="session")
def study_models(tmp_path_factory, tiny, tiny_processor) -> dict[str, Path]:
    """A tiny LLaVA base and relative, and a Llama made from the base's language model."""
    import copy

    from vlmexp.checkpoint import save_model
    from vlmexp.zoo.tiny import build

    root = tmp_path_factory.mktemp("study_models")
    base = tiny("llava")
    vqa = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vqa.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    text = build("llama")
    state = {k.replace("model.language_model.", "model."): v
             for k, v in base.state_dict().items() if k.startswith("model.language_model.")}
    state["lm_head.weight"] = base.state_dict()["lm_head.weight"] * 1.3
    text.load_state_dict(state)
    out = {}
    for name, model in (("base", base), ("vqa", vqa), ("text", text)):
        out[name] = save_model(model, root / name, processor=tiny_processor("llava"))
    return out
