"""The environment line printed under the demo table."""

from __future__ import annotations

import os
import platform

import torch

from vlmexp.environment import cpu_model, describe


def test_describe_names_versions_and_the_cpu():
    line = describe()
    assert line.startswith(f"python {platform.python_version()}, torch {torch.__version__}, ")
    assert f"; CPU: {cpu_model()} ({os.cpu_count()} threads, torch kernels: " in line
    assert torch.backends.cpu.get_cpu_capability() in line
    assert cpu_model()
