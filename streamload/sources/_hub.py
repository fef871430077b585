"""Hugging Face repo ids: resolved to a snapshot folder in huggingface_hub's cache.

huggingface_hub decides where the cache is and whether the hub may be asked (``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``, as it reads them); streamload asks it for
``config.json``, then the index, then the shards the index names (or ``model.safetensors``), one
``hf_hub_download`` each: cached files are found without a request, missing ones are downloaded
with huggingface_hub's own code (its progress bars, its locks, its atomic rename into
``blobs/``). Nothing else in the repo is fetched.

Cancellation: the download runs in a worker thread whose progress callback checks the caller's
cancel scope; a cancelled download stops at its next received block and huggingface_hub deletes
its temporary file, so no partial file is left in the cache under any name.

Cache layout (huggingface_hub's): ``models--{org}--{name}/refs/{revision}`` holds a commit hash;
``snapshots/{commit}/{file}`` are relative symlinks to ``blobs/{hash}``, where an LFS file's
hash is its sha256 (64 hex digits) and a small git file's its git sha1 (40).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamload.checkpoint import INDEX_NAME, parse_index
from streamload.errors import SourceError, SourceUnreachableError

__all__ = ["blob_sha256", "cache_snapshot", "is_repo_id", "snapshot"]

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
CONFIG_NAME = "config.json"


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub repo id, ``org/name`` (the caller checks first
    that no local path of that name exists)."""
    return _REPO_ID.match(text) is not None and ".." not in text


def blob_sha256(path: Path) -> str | None:
    """The sha256 a hub cache records for the (resolved) file ``path``: its blob name, when
    ``path`` is an LFS blob of a ``models--*`` cache folder; ``None`` otherwise."""
    parent = path.parent
    in_cache = parent.name == "blobs" and parent.parent.name.startswith("models--")
    return path.name if in_cache and _SHA256.match(path.name) else None


def cache_snapshot(folder: Path, revision: str) -> Path | None:
    """The snapshot folder of ``revision`` when ``folder`` is a ``models--org--name`` cache
    folder (``None`` when it is not one). A revision the folder does not hold is a
    ``SourceError`` naming the folder and the revision."""
    if not (folder.name.startswith("models--") and (folder / "snapshots").is_dir()):
        return None
    commit = revision
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = folder / "snapshots" / commit
    if (_COMMIT.match(commit) or ref.is_file()) and snapshot.is_dir():
        return snapshot
    known = (
        sorted(p.name for p in (folder / "refs").glob("*")) if (folder / "refs").is_dir() else []
    )
    raise SourceError(
        str(folder),
        f"the cache folder holds no snapshot of it (refs: {', '.join(known) or 'none'})",
        revision=revision,
    )


def snapshot(repo_id: str, revision: str, cancelled: Callable[[], None] | None = None) -> Path:
    """The snapshot folder holding ``repo_id``'s checkpoint at ``revision``, downloading what
    the cache lacks (blocking). ``cancelled`` is called as bytes arrive and raises to stop.

    Errors (``SourceError`` naming the id and the revision): no such repo (or a private or
    gated one without a token), no such revision, no ``config.json`` in the repo, not cached
    while offline; ``SourceUnreachableError`` when the hub cannot be reached.
    """
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    progress = None if cancelled is None else _cancellable_progress(cancelled)

    def fetch(filename: str) -> Path:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id, filename, revision=revision, tqdm_class=progress
            )
        )

    def optional(filename: str) -> Path | None:
        try:
            return fetch(filename)
        except hub_errors.EntryNotFoundError:  # absent from the repo, or not cached offline
            return None

    try:
        config = fetch(CONFIG_NAME)
        index = optional(INDEX_NAME)
        if index is not None:
            for shard in parse_index(index.read_bytes(), index)[1]:
                fetch(shard)
        else:
            optional("model.safetensors")  # else the snapshot's own listing decides
    except Exception as exc:
        raise _hub_error(exc, repo_id, revision, hub_errors) from exc
    return config.parent


def _hub_error(exc: Exception, repo_id: str, revision: str, hub_errors: Any) -> Exception:
    """The one place huggingface_hub's exceptions become streamload's (order matters: gated
    is a kind of not-found, a local miss a kind of missing entry)."""
    if isinstance(exc, SourceError) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, hub_errors.GatedRepoError):
        problem = "the repository is gated: accept its terms on the hub and set HF_TOKEN"
    elif isinstance(exc, hub_errors.RepositoryNotFoundError):
        problem = "no such repository on the hub (or a private one: set HF_TOKEN)"
    elif isinstance(exc, hub_errors.RevisionNotFoundError):
        problem = "the repository has no such revision (branch, tag or commit)"
    elif isinstance(exc, hub_errors.LocalEntryNotFoundError):
        problem = (
            "not in the local cache, and the hub may not be asked (HF_HUB_OFFLINE is set) "
            "or could not be reached"
        )
    elif isinstance(exc, hub_errors.EntryNotFoundError):
        problem = f"the repository has no {CONFIG_NAME} at this revision"
    elif isinstance(exc, ConnectionError | TimeoutError):
        return SourceUnreachableError(
            repo_id, f"the hub cannot be reached: {exc}", revision=revision
        )
    elif isinstance(exc, OSError | hub_errors.HfHubHTTPError):
        problem = f"download failed: {exc}"
    else:
        return exc  # a streamload error from parsing the index, or a bug: unchanged
    return SourceError(repo_id, problem, revision=revision)


def _cancellable_progress(cancelled: Callable[[], None]) -> type[Any]:
    """A huggingface_hub progress-bar class whose every update first calls ``cancelled``."""
    from huggingface_hub.utils.tqdm import tqdm as hub_tqdm

    class _Progress(hub_tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            cancelled()
            result: bool | None = super().update(n)
            return result

    return _Progress
