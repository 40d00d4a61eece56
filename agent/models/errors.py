"""Errors of the model store; each one is a single clear line with a hint where the fix is known."""

from __future__ import annotations

from ..errors import HearthError


class ModelStoreError(HearthError):
    """Something about the model store went wrong (base class)."""


class NotGGUFError(ModelStoreError):
    """A file is not a GGUF model, is truncated, or its header is corrupt."""


class CatalogueError(ModelStoreError):
    """The model catalogue (profiles/models.yaml) or one of its entries is malformed."""


class NoSpaceError(ModelStoreError):
    """The store's file system has not enough free space for a model."""


class HashMismatchError(ModelStoreError):
    """A file's sha256 differs from the one expected; it was not accepted."""


class DownloadError(ModelStoreError):
    """A download failed (network, server, or a file that does not match what was announced)."""


class ModelNotInStore(ModelStoreError):
    """A model name or file is not in the store (nor a path to a GGUF file)."""


class StoreBusyError(ModelStoreError):
    """Another process is downloading or importing the same file right now."""
