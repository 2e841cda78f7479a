"""Error types, raised where a fault is found and printed once, as one line, by the CLI."""

from __future__ import annotations


class VlmexpError(Exception):
    """Base of every error the CLI reports as one line with exit code 2."""


class CheckpointError(VlmexpError):
    """A model folder, shard, index or hub id that cannot be opened or written."""


class LayoutError(VlmexpError):
    """A model whose parameters cannot be placed into components."""


class AlignmentError(LayoutError):
    """Two models whose parameters do not line up (names, shapes, vocabulary)."""


class RecipeError(VlmexpError):
    """A recipe that is malformed, names unknown things, or no longer matches its inputs."""


class MergeError(VlmexpError):
    """A merge that cannot be carried out or produced non-finite weights."""


class EvalError(VlmexpError):
    """An evaluation task or its data that is malformed."""


class ConfigError(VlmexpError):
    """A Hydra configuration that does not validate."""


class TrackingError(VlmexpError):
    """An MLflow run or artifact that is missing or inconsistent."""


def one_line(err: BaseException | str, limit: int | None = None) -> str:
    """An error's text as one line (its lines joined), cut to `limit` characters if given.

    Example:
        >>> one_line(ValueError("bad value\\n  at key x"))
        'bad value at key x'
    """
    text = " ".join(str(err).split()) or type(err).__name__
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text
