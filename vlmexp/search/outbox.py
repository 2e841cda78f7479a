"""Trial records on their way to MLflow: written to disk first, sent when the tracker answers.

Every record of a finished trial goes to `<folder>/trial-NNNNNN.json` (written atomically)
before Optuna is told, and leaves the folder once its child run is logged, so a crash at any
moment, or a tracking server that does not answer, loses nothing: the records wait there and
are sent later (by the next flush of any worker of the study on this machine, or the next run).
A record is sent only once Optuna holds its trial as finished, in the state Optuna holds (a
trial another worker failed as stale is logged FAILED). `Tracker.log_trial` re-uses a trial's
child run, so a record sent twice is logged once.

Example:
    >>> outbox = Outbox(Path(".vlmexp_cache/pending/demo"), tracker)  # doctest: +SKIP
    >>> outbox.put(record); outbox.flush(study)  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from vlmexp.errors import TrackingError, one_line
from vlmexp.merge.fingerprint import Fingerprint
from vlmexp.merge.recipe import Recipe
from vlmexp.search.tracking import Tracker, TrialRecord
from vlmexp.search.workers import INTERRUPTED
from vlmexp.serial import json_safe

RETRY_S = 10.0  # while the tracker does not answer, how often a trial's flush tries again
_FINISHED = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED",
             TrialState.FAIL: "FAIL"}


def record_to_json(record: TrialRecord) -> dict[str, Any]:
    """A record as JSON (the recipe as its YAML text, fingerprints as text)."""
    return {
        "number": record.number, "state": record.state,
        "recipe": record.recipe.to_yaml() if record.recipe is not None else None,
        "values": record.values, "metrics": record.metrics,
        "intermediate": [[step, values] for step, values in record.intermediate],
        "seconds": record.seconds, "weights_digest": record.weights_digest,
        "items": json_safe(record.items) if record.items is not None else None,
        "reason": record.reason, "baseline": record.baseline, "params": json_safe(record.params),
        "fingerprints": {k: f.to_text() for k, f in record.fingerprints.items()},
        "tags": record.tags, "timestamp": record.timestamp,
    }


def record_from_json(data: Mapping[str, Any]) -> TrialRecord:
    recipe = data.get("recipe")
    return TrialRecord(
        number=int(data["number"]), state=str(data["state"]),
        recipe=Recipe.from_yaml_text(recipe, source="queued record") if recipe else None,
        values=dict(data["values"]), metrics=dict(data["metrics"]),
        intermediate=[(int(step), dict(v)) for step, v in data["intermediate"]],
        seconds=dict(data["seconds"]), weights_digest=data.get("weights_digest"),
        items=data.get("items"), reason=data.get("reason"), baseline=data.get("baseline"),
        params=dict(data.get("params") or {}),
        fingerprints={k: Fingerprint.from_text(v)
                      for k, v in (data.get("fingerprints") or {}).items()},
        tags=dict(data.get("tags") or {}), timestamp=data.get("timestamp"))


def reconcile(record: TrialRecord, trial: FrozenTrial) -> TrialRecord:
    """The record as Optuna holds its trial: a trial failed as stale is FAIL, with why."""
    state = _FINISHED[trial.state]
    if state != record.state:
        record.state = state
        record.reason = trial.user_attrs.get(INTERRUPTED) or trial.user_attrs.get("reason") \
            or f"Optuna holds the trial as {state}"
        if state != "COMPLETE":
            record.values = {}
    return record


class Outbox:
    """The on-disk queue of one study's trial records on this machine, and its sending.

    Args:
        folder: where records wait (created on first use).
        tracker: the tracker that logs them.
        start: called (once, before the first record is sent) to start the study's parent run;
            it is retried at the next flush if the tracker does not answer.
    """

    def __init__(self, folder: Path, tracker: Tracker,
                 start: Callable[[], None] | None = None) -> None:
        self.folder = Path(folder)
        self.tracker = tracker
        self._start = start
        self.started = start is None
        self.outage: str | None = None  # the tracker's last error, while it does not answer
        self._retry_at = 0.0  # while it does not answer, no new try before this (monotonic s)

    def path(self, number: int) -> Path:
        return self.folder / f"trial-{number:06d}.json"

    def put(self, record: TrialRecord) -> Path:
        """Write the record (atomically: a temporary file renamed into place)."""
        if record.timestamp is None:  # one timestamp, so a record sent twice logs the same rows
            record.timestamp = int(time.time() * 1000)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(record.number)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record_to_json(record)))
        os.replace(tmp, path)
        return path

    def get(self, number: int) -> TrialRecord | None:
        path = self.path(number)
        try:
            return record_from_json(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("trial-*.json")) if self.folder.is_dir() else []

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One sender at a time on this machine (the lock goes with a killed process)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def flush(self, trials: Mapping[int, FrozenTrial], *, force: bool = False) -> int:
        """Send every waiting record whose trial Optuna holds as finished; stop at the first
        tracking error (the tracker is down: the records wait, and the next flush tries again
        only `RETRY_S` later, unless `force`, so that an unreachable host does not stall every
        trial for its timeout). Returns how many are left."""
        if self.outage is not None and not force and time.monotonic() < self._retry_at:
            return len(self.pending())
        with self._lock():
            try:
                if not self.started:
                    self._start()
                    self.started = True
                for path in self.pending():
                    self._send(path, trials)
            except TrackingError as err:
                if err.__cause__ is None:  # not a failing call: the store's content (a deleted
                    raise                  # experiment) or a bad record, which waiting won't fix
                if self.outage is None:
                    print(f"MLflow does not answer ({one_line(err, 200)}); trial records wait "
                          f"in {self.folder} and are sent when it does", file=sys.stderr)
                self.outage = str(err)
                self._retry_at = time.monotonic() + RETRY_S
                return len(self.pending())
        if self.outage is not None:
            print("MLflow answers again: the waiting trial records are sent", file=sys.stderr)
            self.outage = None
        return len(self.pending())

    def _send(self, path: Path, trials: Mapping[int, FrozenTrial]) -> None:
        try:
            record = record_from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return  # another process sent it
        except (ValueError, KeyError) as err:  # not ours (files are renamed into place)
            path.rename(path.with_name(path.name + ".bad"))
            print(f"{path}: not a trial record ({one_line(err, 120)}); set aside as "
                  f"{path.name}.bad", file=sys.stderr)
            return
        trial = trials.get(record.number)
        if trial is None or trial.state not in _FINISHED:
            return  # its worker has not told Optuna yet (or is dead and not yet recovered)
        self.tracker.log_trial(reconcile(record, trial))
        path.unlink(missing_ok=True)
