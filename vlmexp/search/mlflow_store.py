"""What the tracking writer (`tracking.py`) and reader (`runs.py`) share about the MLflow store.

The default tracking URI, the tag keys of the tracking contract (README, Tracking), the client factory and
the context manager that turns any MLflow or I/O failure into a one-line `TrackingError`.

Example:
    >>> with as_tracking_error("MLflow: open the store"):  # doctest: +SKIP
    ...     client = open_client(DEFAULT_URI)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vlmexp.errors import TrackingError, one_line

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default: the working directory
# MLflow's HTTP client settings for a tracking server (unless the environment sets them)
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                 # not a "View run ... at" line on stdout for every trial run that ends
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_SQLITE = "sqlite:///"

# tag keys (one place for each)
ROLE, STUDY, TRIAL, STATE = "vlmexp.role", "vlmexp.study", "vlmexp.trial", "vlmexp.state"
RECIPE_HASH, DIGEST, BASELINE = "vlmexp.recipe_hash", "vlmexp.weights_digest", "vlmexp.baseline"
REASON, OBJECTIVES, DIRECTIONS = "vlmexp.reason", "vlmexp.objectives", "vlmexp.directions"
BEST_TRIAL, BEST_RUN = "vlmexp.best_trial", "vlmexp.best_run"
PARETO_TRIALS, PARETO_RUNS = "vlmexp.pareto_trials", "vlmexp.pareto_runs"
EXPERIMENT_KIND = "vlmexp.kind"
# MLflow's own experiment tag: this value opens the UI on the training-runs view (not GenAI's)
MLFLOW_KIND, MLFLOW_KIND_VALUE = "mlflow.experimentKind", "custom_model_development"
NOTE = "mlflow.note.content"  # a run's description in the MLflow UI
# parent-run tag prefix of each worker that joined the study (value: its sampler seed)
WORKER_PREFIX = "vlmexp.worker."
# trial-run tag prefix of each component's fingerprint (`merge.fingerprint`: "sum,norm,count")
FINGERPRINT_PREFIX = "vlmexp.fingerprint."
PARENT = "mlflow.parentRunId"
# parent-run param prefix of each evaluation task's identity (version, protocol, prompt digest)
TASK_PREFIX = "task."
# metric keys vlmexp writes itself; every other metric of a trial run is a task metric
OWN_METRIC_PREFIXES = ("objective.", "seconds.", "intermediate.", "test.")


@contextmanager
def as_tracking_error(what: str) -> Iterator[None]:
    """Turn any failure inside into a one-line TrackingError that says what was being done.

    Example:
        >>> with as_tracking_error("MLflow: log trial 3"):  # doctest: +SKIP
        ...     raise OSError("disk full")
        Traceback (most recent call last):
        vlmexp.errors.TrackingError: MLflow: log trial 3: disk full
    """
    try:
        yield
    except TrackingError:
        raise
    except Exception as err:  # MlflowException, sqlalchemy, OSError, ...: never crash the study
        raise TrackingError(f"{what}: {one_line(err, 300)}") from err


def open_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client for `tracking_uri`, without telemetry or progress bars."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if tracking_uri.startswith(("http://", "https://")):
        # MLflow retries a request for minutes by default; a study notices a down server in
        # seconds and queues its records instead (vlmexp.search.outbox)
        for key, value in HTTP_SETTINGS.items():
            os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def sqlite_file(tracking_uri: str) -> Path | None:
    """The file of a SQLite store's URI; None for other stores and in-memory SQLite.

    Example:
        >>> sqlite_file("sqlite:///runs/mlflow.db"), sqlite_file("http://host:5000")
        (PosixPath('runs/mlflow.db'), None)
    """
    if not tracking_uri.startswith(_SQLITE):
        return None
    path = tracking_uri[len(_SQLITE):]
    return None if path in ("", ":memory:") else Path(path)


def direction(text: str) -> str:
    """The direction `text` names: "minimize" if it starts with "min" (any case), else "maximize"."""
    return "minimize" if text.lower().startswith("min") else "maximize"


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str,
               order_by: list[str] | None = None) -> list[Run]:
    """Every run matching `filter_string`, page after page."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def read_artifact(client: MlflowClient, run_id: str, path: str) -> str:
    """The text of a run's artifact (downloaded to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="vlmexp-artifact-") as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return Path(local).read_text()
