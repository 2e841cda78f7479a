"""Lay out a model folder in a Hugging Face hub cache, offline (tests and demos only).

The cache holds each repo as `models--ORG--NAME/` with `blobs/` (file contents by hash),
`snapshots/COMMIT/` (the repo's files at that commit, as relative symlinks into `blobs/`, as
huggingface_hub writes them) and `refs/BRANCH` (the commit a branch points to). With the cache
laid out this way, `org/name` and `org/name@COMMIT` resolve through huggingface_hub's own lookup
(`snapshot_download(..., local_files_only=True)`, `scan_cache_dir`) with no network.

Example:
    >>> import os                                                      # doctest: +SKIP
    >>> os.environ["HF_HUB_CACHE"] = "/tmp/hf/hub"                     # doctest: +SKIP
    >>> commit = lay_out_hub_cache("/tmp/hf/hub", "org/tiny-llava", "models/base")  # doctest: +SKIP
    >>> # python -m vlmexp inspect org/tiny-llava   (with HF_HUB_OFFLINE=1)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from vlmexp.errors import CheckpointError


def lay_out_hub_cache(root: str | os.PathLike, repo_id: str, folder: str | os.PathLike,
                      commit: str | None = None, *, ref: str | None = "main") -> str:
    """Put every file of `folder` into the hub cache `root` as repo `repo_id` at `commit`.

    Args:
        root: the hub cache folder (what `HF_HUB_CACHE` names; `HF_HOME/hub` by default).
        repo_id: `org/name`.
        folder: the model folder whose files (subfolders included) become the snapshot.
        commit: the 40-hex commit hash; default a sha1 of the files' names and contents, so the
            same folder always gets the same commit.
        ref: the branch made to point at `commit` (None: no ref written, the snapshot is only
            reachable by its commit).

    Returns:
        The commit hash.
    """
    source = Path(folder)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise CheckpointError(f"{source}: no files to put in the hub cache")
    if commit is None:
        digest = hashlib.sha1()
        for path in files:
            digest.update(path.relative_to(source).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
        commit = digest.hexdigest()
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise CheckpointError(f"{commit!r}: a commit is 40 lower-case hex digits")
    repo = Path(root) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in files:
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks here: huggingface_hub then stores plain files too
            shutil.copyfile(blob, link)
    if ref is not None:
        ref_file = repo / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)  # no newline: huggingface_hub reads the file as it is
    return commit
