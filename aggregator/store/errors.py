"""Errors of the persistence store (to move into :mod:`common.errors` later).

::

    FedhiveError
    └── StoreError               the store cannot do what was asked (bad URL, database down...)
        ├── SchemaVersionError   the database was written by another fedhive schema version
        ├── ModelNotFoundError   no stored model matches the query (or its bytes were pruned)
        └── BlobError            a model's bytes cannot be served
            ├── MissingBlobError the blob file is gone
            └── CorruptBlobError the blob's bytes do not hash to its name
"""

from __future__ import annotations

from pathlib import Path

from common.errors import FedhiveError


class StoreError(FedhiveError):
    """The persistence store cannot carry out an operation."""


class SchemaVersionError(StoreError):
    """The database holds a schema version this fedhive cannot use."""


class ModelNotFoundError(StoreError):
    """No stored model matches the query, or its bytes were pruned by retention."""


class BlobError(StoreError):
    """A content-addressed blob cannot be served."""

    def __init__(self, message: str, *, sha256: str, path: Path) -> None:
        super().__init__(message)
        self.sha256 = sha256
        self.path = path


class MissingBlobError(BlobError):
    """The blob file for a recorded model does not exist."""


class CorruptBlobError(BlobError):
    """A blob's bytes do not hash to the sha256 it is stored (and recorded) under."""

    def __init__(self, *, sha256: str, actual: str, path: Path) -> None:
        super().__init__(
            f"corrupted blob {sha256}: its bytes hash to {actual} (sha256 mismatch) in {path}; "
            "refusing to serve it",
            sha256=sha256,
            path=path,
        )
        self.actual = actual


__all__ = [
    "BlobError",
    "CorruptBlobError",
    "MissingBlobError",
    "ModelNotFoundError",
    "SchemaVersionError",
    "StoreError",
]
