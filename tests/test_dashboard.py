"""optuna-dashboard on a demo study's Optuna storage: it lists the study, its trials and their
searched weights (what the README tells users to run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest
from _servers import free_port, wait_for

pytestmark = pytest.mark.slow


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_the_demo_table_says_what_it_was_measured_with(demo_study: Path) -> None:
    from vlmexp.environment import describe

    out = (demo_study / "search.out").read_text()
    assert "held-out test split:" in out and f"measured with {describe()}" in out


def test_optuna_dashboard_reads_the_demo_study(demo_study: Path) -> None:
    storage = f"sqlite:///{demo_study / 'optuna.db'}"
    study = optuna.load_study(study_name="demo", storage=storage)
    port = free_port()
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert exe, "optuna-dashboard is not installed beside this Python (./setup.sh dev)"
    proc = subprocess.Popen([exe, storage, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OPTUNA_DASHBOARD_DISABLE_TELEMETRY": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/api/studies", proc)
        studies = get_json(f"{base}/api/studies")["study_summaries"]
        assert [(s["study_name"], s["directions"]) for s in studies] == [("demo", ["maximize"])]
        detail = get_json(f"{base}/api/studies/{studies[0]['study_id']}")
        trials = detail["trials"]
        assert [t["number"] for t in trials] == [t.number for t in study.trials]
        assert [t["state"] for t in trials] == [t.state.name.capitalize()
                                                for t in study.trials]
        # the searched weights, named as the space names them (tied components as one,
        # "language+embed+head.vqa.weight"), with the values Optuna stored
        for shown, stored in zip(trials, study.trials, strict=True):
            params = {p["name"]: float(p["param_internal_value"]) for p in shown["params"]}
            assert params == pytest.approx(
                {k: stored.distributions[k].to_internal_repr(v) for k, v in stored.params.items()})
        best = max((t for t in study.trials if t.values), key=lambda t: t.values[0])
        assert [t["number"] for t in detail["best_trials"]] == [best.number]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
