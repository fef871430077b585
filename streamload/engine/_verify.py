"""``LoadParams(verify=True)``: each file's sha256, computed from the bytes the load reads.

A file's chunks are read out of order (reader lanes and staged reads run side by side, and
units follow the plan, not the file), while sha256 needs the bytes in file order. So each
file gets a sequencer: a chunk that starts where the hash has got to is hashed at once, in the
reader thread that read it (hashlib releases the GIL), followed by every waiting chunk that has
become contiguous; a chunk that arrives early waits. A waiting chunk costs no memory when its
bytes stay where they were read to (a host destination tensor, which the sequencer references
until it is hashed); one read into a staging slot, which is reused at once, is copied first.
Nothing is read from storage twice; the header (read while planning) is read again, a few KiB.

When a file's last byte has been hashed, the digest is compared with the checksum its source
records: a mismatch raises ``ChecksumError`` in that reader thread, which fails its unit and
so the load (everything is released). A file without a recorded checksum, or one the load does
not read in full (memory-mapped tensors, a pipeline stage's share), is reported as unverified.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from streamload.engine._reader import host_view
from streamload.errors import ChecksumError, location
from streamload.events import FileCheck
from streamload.model import ModelSpec
from streamload.sources import SourceFiles

__all__ = ["Verifier"]


class _FileHash:
    """One file's running sha256 and the chunks waiting for their turn (thread-safe)."""

    def __init__(self, path: Path, size: int, header_bytes: int) -> None:
        self.path = path
        self.size = size
        self.header_bytes = header_bytes
        self.cursor = 0  # bytes hashed so far
        self.hash = hashlib.sha256()
        self.waiting: dict[int, list[torch.Tensor]] = {}
        self.lock = threading.Lock()
        self.digest: str | None = None

    def feed(self, files: SourceFiles, offset: int, parts: list[torch.Tensor]) -> str | None:
        """Hash ``parts`` (at ``offset``) now or once the bytes before them are hashed; returns
        the digest when this completed the file."""
        with self.lock:
            if self.cursor == 0:
                self._update([files.head(self.path, self.header_bytes)])
            self.waiting[offset] = parts
            while self.cursor in self.waiting:
                self._update(self.waiting.pop(self.cursor))
            if self.cursor == self.size and self.digest is None:
                self.digest = self.hash.hexdigest()
                return self.digest
            return None

    def _update(self, parts: list[bytes] | list[torch.Tensor]) -> None:
        for part in parts:
            if isinstance(part, bytes):
                self.hash.update(part)
                self.cursor += len(part)
                continue
            view = host_view(part)
            try:
                self.hash.update(view)
            finally:
                view.release()
            self.cursor += part.numel()


class Verifier:
    """The sequencers of one load's files, their expected checksums, and the report."""

    def __init__(
        self, spec: ModelSpec, files: SourceFiles, checksums: Mapping[Path, str | None]
    ) -> None:
        self._files = files
        self._expected = dict(checksums)
        self._hashes = {
            shard.path: _FileHash(shard.path, shard.file_size, shard.data_offset)
            for shard in spec.checkpoint.shards
        }

    def feed(self, path: Path, offset: int, parts: list[torch.Tensor], stable: bool) -> None:
        """A chunk's bytes are in host memory (reader thread). ``stable``: they stay there, so
        a chunk that must wait is referenced, not copied."""
        file = self._hashes[path]
        # A chunk where the hash has got to is hashed before ``feed`` returns: never copied.
        # (The cursor cannot pass ``offset`` before this chunk is hashed.)
        kept = parts if stable or offset == file.cursor else [part.clone() for part in parts]
        digest = file.feed(self._files, offset, kept)
        expected = self._expected.get(path)
        if digest is not None and expected is not None and digest != expected:
            raise ChecksumError(path, expected, digest)

    def checks(self) -> tuple[FileCheck, ...]:
        """One ``FileCheck`` per file, in shard order."""
        out = []
        for path, file in self._hashes.items():
            name = location(path)
            expected = self._expected.get(path)
            if file.digest is None and file.size == file.header_bytes:
                file.feed(self._files, file.header_bytes, [])  # no tensor bytes: header only
                if expected is not None and file.digest != expected:
                    raise ChecksumError(path, expected, str(file.digest))
            if expected is None:
                out.append(FileCheck(name, False, file.digest, "its source records no checksum"))
            elif file.digest is None:
                out.append(FileCheck(name, False, None, "not read in full by this load"))
            else:
                out.append(FileCheck(name, True, file.digest))
        return tuple(out)

    def clear(self) -> None:
        """Drop every waiting chunk (the load ended, or failed)."""
        for file in self._hashes.values():
            with file.lock:
                file.waiting.clear()
