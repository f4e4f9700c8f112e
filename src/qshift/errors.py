"""Errors a user can cause. Each message names the offending input."""

from __future__ import annotations


class QShiftError(Exception):
    """Base class for every error qshift raises on bad user input."""


class InputError(QShiftError, ValueError):
    """A file, caption, image, embedding or parameter that cannot be used."""


class EncoderSpecError(QShiftError, ValueError):
    """An encoder spec string that does not resolve to a model."""


class CheckpointMismatchError(QShiftError, ValueError):
    """A checkpoint whose tensors do not fit the requested architecture."""


class StoreMismatchError(QShiftError, ValueError):
    """An embedding store or index written by another encoder or collection."""
