"""The software and CPU a result was measured with, as one line (the demo table prints it).

The demo zoo is trained on the CPU in float32: another CPU kind (other vector instructions in
torch's kernels) or other library versions train other tiny models, so numbers compare only
with numbers from the same line.

Example:
    >>> describe().startswith("python ")
    True
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "tokenizers", "optuna", "mlflow", "lm_eval", "numpy",
            "pillow", "numba")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """`python X, torch Y, ...; CPU: NAME (N threads, torch kernels: AVX512)`."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    capability = ""
    try:
        import torch

        capability = f", torch kernels: {torch.backends.cpu.get_cpu_capability()}"
    except (ImportError, AttributeError):
        pass
    return (f"python {platform.python_version()}, " + ", ".join(versions)
            + f"; CPU: {cpu_model()} ({os.cpu_count()} threads{capability})")
