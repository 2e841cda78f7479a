"""Several workers on one study, crashes and outages (vlmexp/search/workers.py, outbox.py).

The end-to-end tests start real servers on 127.0.0.1 themselves: a PostgreSQL cluster (Debian's
`postgresql`, which `.ci/run` installs) for Optuna, and `mlflow server` (SQLite backend, proxied
artifact root) for tracking; workers are `python -m vlmexp search` processes.
"""

from __future__ import annotations

import collections
import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from vlmexp.errors import ConfigError
from vlmexp.search.workers import (
    HEARTBEAT,
    INTERRUPTED,
    RETRY_OF,
    make_worker,
    recover_stale_trials,
    stale_reason,
    worker_seed,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "evals" / "examples"
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---------------------------------------------------------------------- liveness, seeds


def test_worker_zero_samples_with_the_study_seed_and_others_with_their_own():
    assert worker_seed(7, "0") == 7
    seeds = {worker_seed(7, w) for w in ("1", "2", "gpu3", "node1-1234")}
    assert len(seeds) == 4 and 7 not in seeds
    assert worker_seed(7, "1") == worker_seed(7, "1") != worker_seed(8, "1")
    assert make_worker(7, None, created=True).id == "0"
    other = make_worker(7, None, created=False)
    assert other.id == f"{socket.gethostname()}-{os.getpid()}" and other.seed != 7
    assert make_worker(7, "3", created=True).seed == worker_seed(7, "3")


def _running(study: optuna.Study, beat: list | None, x: float) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    study._storage.set_trial_param(trial._trial_id, "x", x,
                                   optuna.distributions.FloatDistribution(0.0, 1.0))
    if beat is not None:
        study._storage.set_trial_system_attr(trial._trial_id, HEARTBEAT, beat)
    return study._storage.get_trial(trial._trial_id)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_only_trials_with_a_stale_heartbeat_are_failed_and_run_again(tmp_path, kind):
    from vlmexp.search.study import open_storage

    url = f"sqlite:///{tmp_path / 'o.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'o.log'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    host, now = socket.gethostname(), time.time()
    live = _running(study, [now, "elsewhere", 1, "w1"], 0.1)  # another machine's, beating
    old = _running(study, [now - 300, "elsewhere", 1, "w2"], 0.2)  # stopped 5 minutes ago
    gone = _running(study, [now, host, _dead_pid(), "w3"], 0.3)  # fresh, but its process died
    young = _running(study, None, 0.4)  # just asked: no beat yet, within the grace period
    assert stale_reason(live, now=now, grace=60, host=host) is None
    assert stale_reason(young, now=now, grace=60, host=host) is None
    assert "stopped 300 s ago" in stale_reason(old, now=now, grace=60, host=host)
    assert "is gone" in stale_reason(gone, now=now, grace=60, host=host)
    me = make_worker(0, "me", created=True)
    failed = recover_stale_trials(study, me, grace=60, settle=0.0)
    assert sorted(t.number for t, _ in failed) == [old.number, gone.number]
    # a second worker scanning after the first finds nothing left to do
    assert recover_stale_trials(study, make_worker(0, "other", created=False), grace=60,
                                settle=0.0) == []
    trials = study.trials
    assert [t.state for t in trials[:4]] == [TrialState.RUNNING, TrialState.FAIL,
                                             TrialState.FAIL, TrialState.RUNNING]
    assert "stopped" in trials[old.number].user_attrs[INTERRUPTED]
    rerun = study.ask()  # the re-enqueued parameters come first, once each
    again = study.ask()
    assert [t.suggest_float("x", 0.0, 1.0) for t in (rerun, again)] == [0.2, 0.3]
    assert [rerun.user_attrs[RETRY_OF], again.user_attrs[RETRY_OF]] == [old.number, gone.number]
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_an_unreachable_storage_is_one_line_before_any_model_loads(tmp_path, study_models,
                                                                  capsys, monkeypatch):
    from vlmexp import checkpoint
    from vlmexp.cli import main
    from vlmexp.search.study import open_storage

    with pytest.raises(ConfigError, match=r"^search\.storage postgresql://u:\*\*\*@127\.0\.0\.1"
                                          r":1/db: cannot open it: .*127\.0\.0\.1"):
        open_storage("postgresql://u:secret@127.0.0.1:1/db")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "open_model", no_loading)
    capsys.readouterr()
    assert main(["search", f"models.base={study_models['base']}",
                 f"models.donors.vqa.path={study_models['vqa']}",
                 f"models.donors.text.path={study_models['text']}",
                 "search.storage=postgresql://127.0.0.1:1/optuna", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "vlmexp search: error: search.storage postgresql://127.0.0.1:1/optuna: cannot open it")


def test_a_sqlite_store_is_created_all_or_nothing(tmp_path):
    """A worker killed while MLflow created its tables in place left a half-migrated file no
    later run could open: the tables are made in a file of the worker's own, linked into place."""
    from vlmexp.search.workers import create_sqlite_atomically

    path = tmp_path / "stores" / "mlflow.db"

    def dies(url: str) -> None:
        Path(url[len("sqlite:///"):]).write_text("half")
        raise KeyboardInterrupt  # killed in the middle

    with pytest.raises(KeyboardInterrupt):
        create_sqlite_atomically(path, dies)
    assert not path.exists() and list(path.parent.iterdir()) == []
    create_sqlite_atomically(path, lambda url: MlflowClient(url).search_experiments())
    assert [e.name for e in MlflowClient(f"sqlite:///{path}").search_experiments()] == \
        ["Default"]
    create_sqlite_atomically(path, dies)  # there already: left as it is
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlflow.db"]


# ---------------------------------------------------------------------- the outbox


def _record(number: int, state: str = "COMPLETE"):
    from vlmexp.merge.recipe import Recipe
    from vlmexp.search.tracking import TrialRecord

    recipe = Recipe.from_dict({"vlmexp_recipe": 1, "method": "task_arithmetic",
                               "base": {"path": "zoo/base"},
                               "donors": [{"name": "vqa", "path": "zoo/vqa"}],
                               "components": {"language": {"vqa": {"weight": 0.1 * number}}}})
    done = state == "COMPLETE"
    return TrialRecord(number=number, state=state, recipe=recipe,
                       values={"acc": 0.5 + number / 100} if done else {},
                       metrics={"t.acc": 0.5} if done else {}, intermediate=[(4, {"acc": 0.4})],
                       seconds={"merge": 0.1}, weights_digest=f"isum2:{number}", items=None,
                       params={"w": 0.1 * number}, tags={"vlmexp.worker": "0"})


def test_records_wait_while_the_tracker_is_down_and_are_logged_once(tmp_path):
    """An unreachable tracking server (a closed port): records wait on disk; once it answers
    each is logged once, also when sent again or left half logged by a crash."""
    from vlmexp.search.outbox import Outbox
    from vlmexp.search.tracking import Tracker

    study = optuna.create_study()
    for value in (0.1, 0.2):
        study.tell(study.ask(), value)
    interrupted = study.ask()
    study._storage.set_trial_user_attr(interrupted._trial_id, INTERRUPTED, "worker w is gone")
    study.tell(interrupted, state=TrialState.FAIL)
    trials = {t.number: t for t in study.trials}

    def start(tracker):
        return lambda: tracker.start({"a": 1}, objectives=["acc"], directions=["maximize"],
                                     workers={"0": 0})

    down = Tracker(tracking_uri=f"http://127.0.0.1:{_free_port()}", experiment="e",
                   study_name="s", lazy=True)
    folder = tmp_path / "pending"
    outbox = Outbox(folder, down, start(down))
    for n in range(3):  # trial 2 was told COMPLETE by its worker, failed by another first
        outbox.put(_record(n))
    t0 = time.monotonic()
    assert outbox.flush(trials) == 3 and outbox.outage
    assert time.monotonic() - t0 < 20  # noticed in seconds, not MLflow's minutes of retries
    assert sorted(p.name for p in folder.glob("trial-*.json")) == [
        "trial-000000.json", "trial-000001.json", "trial-000002.json"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    up = Tracker(tracking_uri=uri, experiment="e", study_name="s", lazy=True)
    outbox = Outbox(folder, up, start(up))
    outbox.outage, outbox._retry_at = "down", time.monotonic() + 600  # still waiting to retry
    assert outbox.flush(trials) == 3  # no new try yet: a down host does not stall each trial
    assert outbox.flush(trials, force=True) == 0 and not outbox.outage
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e").experiment_id

    def children():
        runs = client.search_runs([exp], "tags.`vlmexp.role` = 'trial'")
        return sorted((int(r.data.tags["vlmexp.trial"]), r.info.status,
                       r.data.tags["vlmexp.state"]) for r in runs)

    assert children() == [(0, "FINISHED", "COMPLETE"), (1, "FINISHED", "COMPLETE"),
                          (2, "FAILED", "FAIL")]
    failed = client.search_runs([exp], "tags.`vlmexp.trial` = '2'")[0]
    assert failed.data.tags["vlmexp.reason"] == "worker w is gone"
    # the same record again (a crash before its file was removed): nothing new
    outbox.put(_record(1))
    assert outbox.flush(trials) == 0 and len(children()) == 3
    # a run left RUNNING by a crash in the middle of logging is replaced
    run1 = client.search_runs([exp], "tags.`vlmexp.trial` = '1'")[0]
    client.update_run(run1.info.run_id, status="RUNNING")
    outbox.put(_record(1))
    assert outbox.flush(trials) == 0
    assert children() == [(0, "FINISHED", "COMPLETE"), (1, "FINISHED", "COMPLETE"),
                          (2, "FAILED", "FAIL")]
    rerun = client.search_runs([exp], "tags.`vlmexp.trial` = '1'")[0]
    assert rerun.info.run_id != run1.info.run_id
    assert rerun.data.metrics["objective.acc"] == 0.51
    assert [m.value for m in client.get_metric_history(rerun.info.run_id,
                                                       "intermediate.acc")] == [0.4]
    # a record whose trial Optuna still holds RUNNING waits for its worker's tell
    running = study.ask()
    outbox.put(_record(running.number))
    assert outbox.flush({t.number: t for t in study.trials}) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- faults in a trial


def test_faults_inside_trials_fail_them_in_both_stores_and_free_their_memory(
        tmp_path, study_models, monkeypatch):
    """A simulated out-of-memory in evaluation and an evaluation exception: FAIL in Optuna and
    MLflow with the reason, the study goes on, and what the failed trials held is freed."""
    from vlmexp.config import compose
    from vlmexp.eval import Evaluator
    from vlmexp.search.study import run_search

    monkeypatch.chdir(tmp_path)
    held: list[weakref.ref] = []
    real = Evaluator.evaluate
    calls = {"n": 0}

    def faulty(self, model, **kw):
        calls["n"] += 1
        if calls["n"] in (2, 4):  # the second and fourth trials (baselines are off)
            block = torch.empty(64, 1024, 1024, dtype=torch.uint8)  # 64 MiB held by the frame
            held.append(weakref.ref(block))
            if calls["n"] == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            raise RuntimeError("evaluation broke (simulated)")
        return real(self, model, **kw)

    monkeypatch.setattr(Evaluator, "evaluate", faulty)
    cfg = compose([*_tiny_overrides(study_models), "search.n_trials=3", "search.baselines=false",
                   "search.pruning.enabled=false", "study_name=faults",
                   f"search.storage=sqlite:///{tmp_path / 'o.db'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    run_search(cfg, progress=False)
    study = optuna.load_study(study_name="faults", storage=cfg.search.storage)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL,
                      TrialState.COMPLETE]
    assert study.trials[1].user_attrs["reason"] == \
        "OutOfMemoryError: CUDA out of memory (simulated)"
    assert study.trials[3].user_attrs["reason"] == "RuntimeError: evaluation broke (simulated)"
    assert len(held) == 2 and all(ref() is None for ref in held)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("faults").experiment_id
    runs = {int(r.data.tags["vlmexp.trial"]): r for r in client.search_runs([exp])
            if r.data.tags.get("vlmexp.role") == "trial"}
    assert [runs[n].info.status for n in range(5)] == ["FINISHED", "FAILED", "FINISHED",
                                                       "FAILED", "FINISHED"]
    assert runs[1].data.tags["vlmexp.reason"] == study.trials[1].user_attrs["reason"]


def test_a_worker_that_loses_the_race_for_its_trial_says_so_and_goes_on(
        tmp_path, study_models, monkeypatch, capsys):
    """Another worker fails this worker's second trial as stale while it evaluates (a long
    pause): this worker does not tell it, says why, logs it as Optuna holds it (FAILED), and
    the study still ends with n_trials evaluated."""
    from vlmexp.config import compose
    from vlmexp.eval import Evaluator
    from vlmexp.search.study import run_search

    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    real = Evaluator.evaluate
    calls = {"n": 0}

    def paused(self, model, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # meanwhile, another worker finds the trial stale and fails it
            study = optuna.load_study(study_name="race", storage=storage)
            running = study.get_trials(states=(TrialState.RUNNING,))[0]
            study._storage.set_trial_user_attr(running._trial_id, INTERRUPTED, "paused too long")
            study._storage.set_trial_state_values(running._trial_id, TrialState.FAIL)
        return real(self, model, **kw)

    monkeypatch.setattr(Evaluator, "evaluate", paused)
    cfg = compose([*_tiny_overrides(study_models), "search.n_trials=3", "search.baselines=false",
                   "search.pruning.enabled=false", "study_name=race", f"search.storage={storage}",
                   f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    run_search(cfg, progress=False)
    assert "trial 1: another worker finished it first (FAIL: paused too long)" in \
        capsys.readouterr().err
    study = optuna.load_study(study_name="race", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                               TrialState.COMPLETE, TrialState.COMPLETE]
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("race").experiment_id
    lost = client.search_runs([exp], "tags.`vlmexp.trial` = '1'")
    assert len(lost) == 1 and lost[0].info.status == "FAILED"
    assert lost[0].data.tags["vlmexp.reason"] == "paused too long"


def _tiny_overrides(models: dict[str, Path]) -> list[str]:
    """The tiny models and one image task (no lm-eval: faster workers)."""
    return [f"models.base={models['base']}", f"models.donors.vqa.path={models['vqa']}",
            f"models.donors.text.path={models['text']}", "device=cpu", "threads=1",
            f"eval.tasks=[{EXAMPLES / 'shapes_jsonl.yaml'}]", "eval.test_tasks=[]",
            "~eval.objectives", "+eval.objectives={shapes: {example_shapes_jsonl: 1.0}}",
            "search.objectives=[shapes]",
            "search.sampler=random", "search.pruning.startup_trials=2",
            "search.heartbeat=1", "search.grace=6", "tracking.wait=120"]


# ---------------------------------------------------------------------- real servers


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    initdb = Path(found[0]) if found else (Path(shutil.which("initdb")) if shutil.which("initdb")
                                            else None)
    if initdb is None:
        pytest.fail("PostgreSQL is not installed: `apt-get install -y postgresql` (Debian; "
                    ".ci/run does it) or your system's package of it")
    return initdb.parent


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL cluster on 127.0.0.1 (a free port), stopped at the end; yields a
    function that creates a database and returns its URL."""
    bindir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="vlmexp-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                                      "-A", "trust", "-E", "UTF8", "--no-sync"]), **run)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} " \
              "-c fsync=off -c max_connections=200"
    subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", options,
                                      "-l", str(root / "log"), "-w", "-t", "60", "start"]), **run)

    def database(name: str) -> str:
        subprocess.run([str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "postgres", "-q", "-c", f"CREATE DATABASE {name}"], **run)
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                                          "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a proxied artifact root, which
    can be stopped and started again on the same port and stores (an outage)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "ab"),
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not answer in 180 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _worker(cwd: Path, models: dict[str, Path], *overrides: str) -> subprocess.Popen:
    """A `python -m vlmexp search` worker process on the tiny models (this checkout's code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / "worker.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "vlmexp", "search",
                             *_tiny_overrides(models), *overrides, "--no-progress"],
                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    for p in procs:
        assert p.wait(timeout) == 0, f"worker exited with {p.returncode}"


def check_study(storage: str, tracking_uri: str, name: str, n_trials: int) -> dict:
    """The checks of one study across both stores (issue 15, points 1 and 3); returns figures.

    Every trial Optuna holds finished has exactly one active child run in the state's status,
    with its recipe.yaml (and objective metrics when complete); nothing is RUNNING in either
    store; baselines ran once; the evaluated trials are exactly n_trials.
    """
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.trials
    states = collections.Counter(t.state.name for t in trials)
    assert states["RUNNING"] == 0 and states["WAITING"] == 0, states
    assert states["COMPLETE"] + states["PRUNED"] == n_trials, states
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert all(INTERRUPTED in t.user_attrs for t in interrupted), "a FAIL that is no crash's"
    baselines = collections.Counter(t.user_attrs["vlmexp.baseline"] for t in trials
                                    if "vlmexp.baseline" in t.user_attrs and RETRY_OF not in
                                    t.user_attrs)
    assert baselines and set(baselines.values()) == {1}, baselines
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("vlmexp.role") == "study"]
    assert [p.info.status for p in parents] == ["FINISHED"]
    children = [r for r in runs if r.data.tags.get("vlmexp.role") == "trial"]
    per_trial = collections.Counter(int(r.data.tags["vlmexp.trial"]) for r in children)
    assert per_trial == {t.number: 1 for t in trials}, per_trial
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    by_number = {t.number: t for t in trials}
    for run in children:
        trial = by_number[int(run.data.tags["vlmexp.trial"])]
        assert run.info.status == status[trial.state.name], (trial.number, run.info.status)
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        if trial.params:  # a trial killed before it sampled has no recipe to show
            assert "recipe.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        if trial.state == TrialState.COMPLETE:
            assert run.data.metrics["objective.shapes"] == trial.value
            assert run.data.tags["vlmexp.worker"] == trial.user_attrs["vlmexp.worker"]
    return {"states": dict(states), "workers": collections.Counter(
        t.user_attrs.get("vlmexp.worker") for t in trials), "parent": parents[0]}


def readme_blocks(section: str) -> list[str]:
    """The bash blocks of a README section, as written."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def _substitute(block: str, swaps: dict[str, str]) -> str:
    for old, new in swaps.items():
        assert old in block, f"the README's block no longer has {old!r}"
        block = block.replace(old, new)
    return block


@pytest.mark.slow
def test_the_readmes_workers_share_one_study(tmp_path, study_models, postgres, mlflow_server):
    """The README's "Several GPUs / several machines" commands, run as written on loopback
    (its servers' URIs, the tiny models, fewer trials and GPUs): two workers of the per-GPU
    loop and one SLURM array task, started together on one PostgreSQL study and one tracking
    server. One parent run, one child run per trial, baselines once, no FAIL, each worker with
    its own recorded seed, n_trials evaluated in all."""
    storage = postgres("big")
    per_gpu, slurm = readme_blocks("Several GPUs / several machines")[1:3]
    python = f"{sys.executable} -m vlmexp search " + " ".join(
        f"'{o}'" for o in _tiny_overrides(study_models))
    swaps = {"postgresql://vlmexp:secret@db-host:5432/optuna": storage,
             "http://mlflow-host:5000": mlflow_server.uri,
             "python -m vlmexp search": python, "search.n_trials=400": "search.n_trials=8"}
    per_gpu = _substitute(per_gpu, {**swaps, "for gpu in 0 1 2 3": "for gpu in 0 1"})
    slurm = _substitute(slurm, swaps)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    (tmp_path / "workers.sh").write_text(slurm)
    procs = [subprocess.Popen(["bash", "-c", per_gpu], cwd=tmp_path, env=env),
             subprocess.Popen(["bash", "workers.sh"], cwd=tmp_path,
                              env={**env, "SLURM_ARRAY_TASK_ID": "2"},
                              stdout=open(tmp_path / "worker-slurm.log", "wb"),
                              stderr=subprocess.STDOUT)]
    _wait(procs)
    found = check_study(storage, mlflow_server.uri, "big", 8)
    assert found["states"].get("FAIL", 0) == 0
    host = socket.gethostname()
    assert set(found["workers"]) <= {f"{host}-gpu0", f"{host}-gpu1", "2"}
    assert len(found["workers"]) >= 2, found["workers"]  # started together, they shared it
    seeds = {k[len("vlmexp.worker."):]: v for k, v in found["parent"].data.tags.items()
             if k.startswith("vlmexp.worker.")}
    assert set(seeds) == {f"{host}-gpu0", f"{host}-gpu1", "2"}
    assert seeds["2"] == str(worker_seed(0, "2")) and len(set(seeds.values())) == 3
    study = optuna.load_study(study_name="big", storage=storage)
    for t in study.trials:
        assert str(t.user_attrs["vlmexp.sampler_seed"]) == seeds[t.user_attrs["vlmexp.worker"]]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_restart_loses_nothing(tmp_path, study_models, postgres,
                                                              mlflow_server):
    """A worker SIGKILLed three times at seeded random moments while it runs trials (merging,
    evaluating or logging), restarted each time: nothing is lost or logged twice."""
    storage = postgres("killed")
    common = ["study_name=killed", f"search.storage={storage}",
              f"tracking.uri={mlflow_server.uri}", "search.n_trials=10"]
    rng = random.Random(15)
    study = None
    kills = 0
    for _ in range(3):
        proc = _worker(tmp_path / "w", study_models, *common)
        before = len(study.trials) if study is not None else 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:  # its first trial
            try:
                study = study or optuna.load_study(study_name="killed", storage=storage)
                if len(study.trials) > before:
                    break
            except KeyError:
                pass
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
    assert kills >= 2
    _wait([_worker(tmp_path / "w", study_models, *common)])
    check_study(storage, mlflow_server.uri, "killed", 10)


@pytest.mark.slow
def test_a_tracking_outage_mid_study_queues_records_and_sends_them_once(tmp_path, study_models,
                                                                        mlflow_server):
    """The tracking server stops after the first trial is logged and comes back a few trials
    later: the study goes on, and every trial ends up logged once."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = _worker(tmp_path / "w", study_models, "study_name=outage", f"search.storage={storage}",
                   f"tracking.uri={mlflow_server.uri}", "search.n_trials=12")
    client = MlflowClient(mlflow_server.uri)

    def logged() -> int:
        exp = client.get_experiment_by_name("outage")
        if exp is None:
            return 0
        return len(client.search_runs([exp.experiment_id], "tags.`vlmexp.role` = 'trial'"))

    def finished() -> int:
        try:
            study = optuna.load_study(study_name="outage", storage=storage)
        except KeyError:
            return 0
        return sum(t.state.is_finished() for t in study.trials)

    deadline = time.monotonic() + 300
    while logged() == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    mlflow_server.stop()
    try:
        during = finished()
        while finished() < during + 3 and proc.poll() is None:  # trials go on meanwhile
            time.sleep(0.2)
        assert proc.poll() is None, "the study stopped during the outage"
        queued = list((tmp_path / "w" / ".vlmexp_cache" / "pending" / "outage").glob("*.json"))
        assert queued, "no record waited on disk"
    finally:
        mlflow_server.start()
    _wait([proc])
    check_study(storage, mlflow_server.uri, "outage", 12)
    log = (tmp_path / "w" / "worker.log").read_text()
    assert "MLflow does not answer" in log and "MLflow answers again" in log
