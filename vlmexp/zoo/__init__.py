"""The demo model family and the tiny test models (test and demo only).

Production code imports nothing from here but the two name resolvers below, which the commands
and the study loop call for the `zoo:NAME` and `tiny:NAME` model names.

Example:
    >>> resolve_zoo("models/base", None)
    'models/base'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmexp.errors import CheckpointError, ConfigError

ZOO_PREFIX = "zoo:"
TINY_PREFIX = "tiny:"
ZOO_MODELS = ("base", "vqa-expert", "text-expert")


def resolve_zoo(spec: str, zoo_dir: str | Path | None, *, progress: bool = True) -> str:
    """`zoo:NAME` → the folder of that demo model (the zoo is built on first use, under
    `zoo_dir` or `vlmexp.zoo.build.default_root()`); any other spec is returned as it is."""
    if not spec.startswith(ZOO_PREFIX):
        return spec
    name = spec.removeprefix(ZOO_PREFIX)
    if name not in ZOO_MODELS:
        raise ConfigError(f"models: {spec!r} is not a zoo model (zoo: {', '.join(ZOO_MODELS)})")
    from vlmexp.zoo.build import ensure_zoo

    return str(ensure_zoo(zoo_dir, progress=progress).root / name)


def is_tiny(spec: str) -> bool:
    return spec.startswith(TINY_PREFIX)


def open_tiny(spec: str, *, with_processor: bool = True) -> tuple[Any, Any]:
    """`tiny:NAME` → (a tiny random model, its tiny processor or None); see `vlmexp.zoo.tiny`."""
    from vlmexp.zoo.tiny import BUILDERS, build

    name = spec.removeprefix(TINY_PREFIX)
    if name not in BUILDERS:
        raise CheckpointError(f"unknown tiny model {spec!r}; known: "
                              + ", ".join(TINY_PREFIX + n for n in BUILDERS))
    if not with_processor:
        return build(name), None
    from vlmexp.zoo.tiny_processors import BUILDERS as PROCESSORS
    from vlmexp.zoo.tiny_processors import build_processor

    if name not in PROCESSORS:
        raise CheckpointError(f"{spec!r} is a text-only tiny model with no processor; known "
                              f"VLMs: " + ", ".join(TINY_PREFIX + n for n in PROCESSORS))
    return build(name), build_processor(name)
