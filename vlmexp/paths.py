"""Where the project's own files are: `conf/` and paths written relative to the project.

Example:
    >>> project_path("evals/demo").name
    'demo'
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


def project_path(path: str | Path) -> Path:
    """A path as given when it exists (or is absolute), else relative to the project root, so
    that `evals/demo/...` in a config works from any working directory."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else PROJECT_ROOT / p
