"""Several workers on one study: who a worker is, its sampling seed, the heartbeat of the trial
it runs, and the recovery of trials whose worker died.

Optuna's storage is the only coordination point. Each running trial carries a heartbeat (a
trial system attr: time, host, pid, worker), written by a background thread; a trial whose
heartbeat is older than the grace period, or whose worker's process is gone on this host, is
stale, and any worker fails it and enqueues its parameters again. Optuna's own heartbeat covers
`study.optimize` only, not ask and tell.

Some of Optuna's transitions are not atomic on SQLite (its driver begins a transaction at the
first write, so two workers can both read a trial RUNNING or WAITING); where two workers could
both act on one trial, `claim` settles it: each writes its token, waits a moment and reads back,
and only the last writer goes on.

Example:
    >>> worker_seed(0, "0"), worker_seed(0, "1") != 0
    (0, True)
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

# trial system attr: [unix time, host, pid, worker id], refreshed while the trial runs
HEARTBEAT = "vlmexp.heartbeat"
OWNER = "vlmexp.owner"          # trial system attr: the token of the worker that popped it
RECOVERER = "vlmexp.recovered_by"  # trial system attr: the token of the worker failing it
# trial user attrs (shown by Optuna's tools and logged as tags)
WORKER = "vlmexp.worker"        # the worker id that ran the trial
SEED = "vlmexp.sampler_seed"    # that worker's sampler seed
INTERRUPTED = "vlmexp.interrupted"  # why a trial was failed for a stale heartbeat
RETRY_OF = "vlmexp.retry_of"    # on a re-enqueued trial: the number of the trial it re-runs
# errors a storage raises when another worker finished the trial first
LOST_RACE = (UpdateFinishedTrialError, StorageInternalError, RuntimeError, ValueError)


@dataclass(frozen=True)
class Worker:
    """This process as a worker of a study: its id, sampler seed, host and pid."""

    id: str
    seed: int
    host: str
    pid: int

    @property
    def token(self) -> str:
        return f"{self.id}@{self.host}:{self.pid}"


def make_worker(study_seed: int, explicit: str | None, *, created: bool) -> Worker:
    """The worker: id `explicit` (`search.worker_id`), else `$VLMEXP_WORKER_ID`, else "0" for
    the process that created the study and `<host>-<pid>` for any other; its seed from the
    study's seed and the id (`worker_seed`), so a lone worker samples as `search.seed` says."""
    host, pid = socket.gethostname(), os.getpid()
    wid = explicit or os.environ.get("VLMEXP_WORKER_ID") or ("0" if created else f"{host}-{pid}")
    return Worker(id=str(wid), seed=worker_seed(study_seed, str(wid)), host=host, pid=pid)


def worker_seed(study_seed: int, worker_id: str) -> int:
    """Worker "0" samples with the study's seed; any other with a seed derived from both."""
    if worker_id == "0":
        return int(study_seed)
    digest = hashlib.sha256(f"{study_seed}:{worker_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ---------------------------------------------------------------------- SQLite files


def create_sqlite_atomically(path: Path, init: Callable[[str], None]) -> None:
    """Create the SQLite file `path` with its tables, all or nothing: `init(url)` builds them
    in a file of this process, which is then linked into place unless another worker's got
    there first. (A worker killed while MLflow or Optuna created the tables in place left a
    half-migrated file that no later run could open.)"""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        init(f"sqlite:///{tmp}")
        try:
            os.link(tmp, path)  # atomic, and never replaces a file another worker linked
        except FileExistsError:
            pass
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


# ---------------------------------------------------------------------- claims


def claim(storage: optuna.storages.BaseStorage, trial_id: int, key: str, token: str, *,
          settle: float) -> bool:
    """Write `token` to the trial's system attr `key`, wait `settle` s, and say whether it is
    still ours (the last of several writers wins). False if the trial finished meanwhile."""
    try:
        storage.set_trial_system_attr(trial_id, key, token)
        if settle > 0:
            time.sleep(settle)
        current = storage.get_trial(trial_id)
    except LOST_RACE:
        return False
    return current.system_attrs.get(key) == token and current.state == TrialState.RUNNING


# ---------------------------------------------------------------------- heartbeat


class Heartbeat:
    """A background thread that refreshes a running trial's heartbeat every `interval` s.

    Example:
        >>> with Heartbeat(study._storage, trial._trial_id, worker, interval=15):  # doctest: +SKIP
        ...     record = run_trial(...)
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, worker: Worker, *,
                 interval: float) -> None:
        self.storage, self.trial_id, self.worker = storage, trial_id, worker
        self.interval = interval
        self.lost = False  # the trial was finished by another worker meanwhile
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlmexp-heartbeat", daemon=True)

    def beat(self) -> None:
        try:
            self.storage.set_trial_system_attr(
                self.trial_id, HEARTBEAT,
                [time.time(), self.worker.host, self.worker.pid, self.worker.id])
        except UpdateFinishedTrialError:
            self.lost = True
        except Exception as err:  # noqa: BLE001 - a missed beat is not a failed trial
            print(f"heartbeat of trial id {self.trial_id}: {type(err).__name__}: {err}",
                  file=sys.stderr)

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and not self.lost:
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------- stale trials


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(trial: FrozenTrial, *, now: float, grace: float, host: str) -> str | None:
    """Why a RUNNING trial's worker is presumed dead, or None while it is alive."""
    beat = trial.system_attrs.get(HEARTBEAT)
    if beat:
        at, beat_host, pid = float(beat[0]), str(beat[1]), int(beat[2])
        worker = beat[3] if len(beat) > 3 else "?"
        if beat_host == host and pid != os.getpid() and not _alive(pid):
            return f"worker {worker} (pid {pid} on {host}) is gone"
        if now - at > grace:
            return f"worker {worker}'s heartbeat stopped {now - at:.0f} s ago"
        return None
    # asked, but the worker died before its first beat (or an older vlmexp ran it)
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    if now - started > grace:
        return f"no heartbeat {now - started:.0f} s after its start"
    return None


def recover_stale_trials(study: optuna.Study, worker: Worker, *, grace: float, settle: float,
                         finish: Callable[[FrozenTrial], bool] | None = None
                         ) -> list[tuple[FrozenTrial, str]]:
    """Fail the RUNNING trials whose worker is gone and enqueue their parameters again.

    `finish(trial)` runs first for each trial this worker claims: True means it told Optuna
    the trial's result itself (from a record its dead worker left on disk), so the trial is
    neither failed nor enqueued. Returns the trials failed here, with why.
    """
    storage = study._storage
    now = time.time()
    done: list[tuple[FrozenTrial, str]] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(t, now=now, grace=grace, host=worker.host)
        if reason is None or not claim(storage, t._trial_id, RECOVERER, worker.token,
                                       settle=settle):
            continue
        if finish is not None and finish(t):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, INTERRUPTED, reason)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except LOST_RACE:
            continue  # another worker failed it first; it enqueued the re-run
        # the re-run keeps what the trial was (a baseline's name), not what its run found
        attrs = {k: v for k, v in t.user_attrs.items()
                 if k.startswith("vlmexp.") and k not in (WORKER, SEED, INTERRUPTED)}
        attrs[RETRY_OF] = t.number
        params = {**(t.system_attrs.get("fixed_params") or {}), **t.params}
        if params:  # a trial killed before it sampled anything took no candidate
            study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
        print(f"trial {t.number} failed ({reason}); its parameters are enqueued again",
              file=sys.stderr)
        done.append((t, reason))
    return done
