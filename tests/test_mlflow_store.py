"""What the tracking writer and reader share: the SQLite file of a URI, directions, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmexp.errors import TrackingError
from vlmexp.search.mlflow_store import DEFAULT_URI, as_tracking_error, direction, sqlite_file


def test_sqlite_file_of_a_uri():
    assert sqlite_file(DEFAULT_URI) == Path("mlflow.db")
    assert sqlite_file("sqlite:////abs/runs/m.db") == Path("/abs/runs/m.db")
    assert sqlite_file("sqlite:///:memory:") is None
    assert sqlite_file("sqlite:///") is None
    assert sqlite_file("http://localhost:5000") is None


def test_direction_names():
    assert [direction(d) for d in ("minimize", "MINIMIZE", "min", "maximize", "MAXIMIZE")] == [
        "minimize", "minimize", "minimize", "maximize", "maximize"]


def test_failures_become_one_line_tracking_errors():
    with pytest.raises(TrackingError) as err:
        with as_tracking_error("MLflow: log trial 3"):
            raise OSError("disk full\nsecond line")
    assert str(err.value) == "MLflow: log trial 3: disk full second line"
    assert isinstance(err.value.__cause__, OSError)
    with pytest.raises(TrackingError, match="^as it was$"):  # not wrapped a second time
        with as_tracking_error("MLflow: outer"):
            raise TrackingError("as it was")
