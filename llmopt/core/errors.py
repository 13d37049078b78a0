"""Errors every layer of llmopt raises or catches."""

from __future__ import annotations

__all__ = ["CompressionError", "SkipLayer"]


class CompressionError(RuntimeError):
    """A layer could not be compressed; the model was left exactly as it was."""


class SkipLayer(Exception):
    """Raised by a layer-scope handler to leave its layer as it is (e.g. a factorization that would
    not save parameters). ``compress_`` records ``"<method>: <reason>"`` in ``report.skipped`` and
    goes on with the other layers; nothing is rolled back."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = str(reason)
