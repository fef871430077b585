"""Where checkpoints come from: a local path, a Hugging Face repo id, an object-store URL.

``resolve`` turns what the caller named into a ``Source``: the parsed checkpoint, its config,
the sha256 each file's source records (for ``LoadParams.verify``), and, for an object store,
the object reader the engine reads through instead of local files. In order:

1. ``s3://``, ``gs://``, ``az://``: an object-store prefix (``_object``);
2. an existing local path: a checkpoint directory or file, a snapshot folder of the hub cache,
   or a ``models--org--name`` cache folder (resolved at ``LoadParams.revision``);
3. ``org/name`` with no local path of that name: a hub repo id (``_hub``);
4. anything else: a local path, which then fails as "no such file or directory".

Objects are named in entries and messages by their URL carried in a ``Path``
(``streamload.errors.location`` prints it back with its ``//``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from streamload.checkpoint import Checkpoint, open_checkpoint
from streamload.model import CONFIG_NAME, load_config
from streamload.sources._hub import blob_sha256, cache_snapshot, is_repo_id, snapshot
from streamload.sources._object import ObjectFiles, is_url, open_url

__all__ = ["ObjectFiles", "Source", "SourceFiles", "is_url", "resolve"]


class SourceFiles(Protocol):
    """How the engine's reader threads get a checkpoint's bytes (blocking calls, thread-safe).

    ``local``: the files are local, so ``fd`` gives a descriptor (read-ahead advice, page-cache
    probes and memory maps use it); objects are read by range only. ``read`` calls ``prepare``
    (when given) once before the bytes land: a file's before its read, an object's once its
    request is answered, so the work overlaps the transfer.
    """

    local: bool

    def fd(self, path: Path) -> int: ...

    def read(
        self,
        path: Path,
        views: list[memoryview],
        offset: int,
        tensor: str,
        prepare: Callable[[], None] | None = None,
    ) -> None: ...

    def head(self, path: Path, nbytes: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Source:
    """A resolved checkpoint source.

    ``name`` as the caller gave it; ``kind`` ``"local"``, ``"hub"`` or ``"object"``;
    ``checksums`` the sha256 (hex) each shard's source records, ``None`` where it records none;
    ``objects`` the object reader (``None``: local files, read by the engine's own ``Files``).
    """

    name: str
    kind: str
    checkpoint: Checkpoint
    config: Mapping[str, Any]
    checksums: Mapping[Path, str | None] = field(default_factory=dict)
    objects: ObjectFiles | None = None

    @property
    def local(self) -> bool:
        return self.objects is None


def resolve(
    source: str | os.PathLike[str],
    *,
    revision: str = "main",
    storage_options: Mapping[str, str] | None = None,
    connect_timeout: float = 30.0,
    verify: bool = False,
    cancelled: Callable[[], None] | None = None,
    config_optional: bool = False,
) -> Source:
    """Resolve ``source`` and read its headers and config (blocking; no tensor data).

    ``cancelled`` is called while a hub download receives bytes and raises to stop it.
    ``config_optional``: a local checkpoint without ``config.json`` gets an empty config.
    Errors are ``StreamloadError``s naming the path, the id and revision, or the URL.
    """
    text = os.fspath(source)
    if is_url(text):
        opened = open_url(text, storage_options or {}, connect_timeout, verify)
        checksums = opened.files.checksums if verify else {}
        return Source(text, "object", opened.checkpoint, opened.config, checksums, opened.files)
    path = Path(text)
    if path.exists():
        folder = cache_snapshot(path.absolute(), revision)
        return _local(text, "hub" if folder else "local", folder or path, config_optional)
    if is_repo_id(text):
        return _local(text, "hub", snapshot(text, revision, cancelled), config_optional)
    return _local(text, "local", path, config_optional)


def _local(name: str, kind: str, path: Path, config_optional: bool) -> Source:
    checkpoint = open_checkpoint(path)
    missing = config_optional and not (checkpoint.root / CONFIG_NAME).exists()
    config = {} if missing else load_config(checkpoint.root)
    checksums = {shard.path: blob_sha256(shard.path) for shard in checkpoint.shards}
    return Source(name, kind, checkpoint, config, checksums)
