"""Exceptions cachepass raises on purpose.

``OptionError`` is a ``ValueError`` (what users catch for a bad option). It also derives from Dynamo's
``ShortenTraceback`` because Dynamo wraps every other exception a backend raises into
``BackendCompilerFailed``; this way ``torch.compile(m, backend="cachepass", options={...})`` with a bad
option raises the same ``ValueError`` as ``cachepass.backend(...)`` does, at the first call.
"""

from __future__ import annotations

from ._dynamo import ShortenTraceback


class OptionError(ValueError, ShortenTraceback):
    """An unknown option, or an option with an invalid value."""

    def __init__(self, message: str) -> None:
        ShortenTraceback.__init__(self, message, first_useful_frame=None)

    def remove_dynamo_frames(self):  # keep our own frames: they say where the option was read
        return self


class UnsupportedStructure(Exception):
    """The analysis could not make a cacheable program of this graph; the backend falls back."""


class SplitStack(UnsupportedStructure):
    """A graph break splits the block list ``parent`` over several graphs; each fragment runs uncached."""

    def __init__(self, message: str, parent: str) -> None:
        super().__init__(message)
        self.parent = parent


class NoBlockStack(UnsupportedStructure):
    """The graph holds no run of same-class blocks: nothing in it to cache (it may be a helper graph
    beside the one that holds the stack)."""
