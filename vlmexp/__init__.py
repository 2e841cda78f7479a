"""vlmexp: merge-and-evaluate experiments for vision-language models."""

__version__ = "0.1.0"
