"""Content-addressed model bytes: ``{root}/ab/abcdef...`` named by their sha256.

A blob is written once, atomically (temporary file, fsync, rename, fsync of the directory), so
a crash leaves either the whole blob or none of it; a read re-hashes the bytes and refuses any
that do not match their name. Blobs are plain bytes (our codec frames), never pickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from aggregator.store.errors import CorruptBlobError, MissingBlobError, StoreError

Buffer = bytes | bytearray | memoryview

_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 1 << 20


def sha256_of(payload: Buffer) -> str:
    return hashlib.sha256(payload).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Model bytes on disk by content hash; safe to share between processes on one host."""

    def __init__(self, *, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        """Where the blob named ``sha256`` lives (StoreError on anything but 64 hex digits)."""
        if not _SHA256.fullmatch(sha256):
            raise StoreError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, payload: Buffer) -> str:
        """Store ``payload`` durably and return its sha256 (a no-op when it is already there)."""
        sha = sha256_of(payload)
        target = self.path(sha)
        if target.is_file() and target.stat().st_size == memoryview(payload).nbytes:
            return sha  # same name, same size: the read-time hash check covers the rest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{sha[:12]}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(target.parent)
        return sha

    def get(self, sha256: str) -> bytes:
        """The blob's bytes, verified against its name.

        Raises:
            MissingBlobError: no such blob.
            CorruptBlobError: the bytes hash to something else.
        """
        path = self.path(sha256)
        try:
            payload = path.read_bytes()
        except FileNotFoundError:
            raise MissingBlobError(
                f"blob {sha256} is missing from {self.root}", sha256=sha256, path=path
            ) from None
        actual = sha256_of(payload)
        if actual != sha256:
            raise CorruptBlobError(sha256=sha256, actual=actual, path=path)
        return payload

    def verify(self, sha256: str) -> None:
        """Re-hash a blob without keeping it in memory; the errors of :meth:`get`."""
        path = self.path(sha256)
        digest = hashlib.sha256()
        try:
            with path.open("rb") as f:
                while block := f.read(_READ_BLOCK):
                    digest.update(block)
        except FileNotFoundError:
            raise MissingBlobError(
                f"blob {sha256} is missing from {self.root}", sha256=sha256, path=path
            ) from None
        if digest.hexdigest() != sha256:
            raise CorruptBlobError(sha256=sha256, actual=digest.hexdigest(), path=path)

    def delete(self, sha256: str) -> bool:
        """Remove a blob; False if it was not there."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        """The sha256 of every stored blob."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    if _SHA256.fullmatch(f.name) and f.name.startswith(sub.name):
                        yield f.name
