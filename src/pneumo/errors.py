"""Errors a user can act on: each message names the file or option and says what to do next."""

from __future__ import annotations


class PneumoError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero, without a traceback."""


class DataError(PneumoError):
    """The data set on disk cannot be used as it is (missing folders, no images, a class left empty)."""


class ImageError(PneumoError):
    """One image file cannot be read; carries the path and the reason."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(PneumoError):
    """Pretrained weights are unavailable or do not fit the chosen backbone."""


class ModelError(PneumoError):
    """A saved model folder is missing files or does not match this version of pneumo."""


class TrainingError(PneumoError):
    """Training cannot continue (a non-finite loss, a checkpoint that does not match its run)."""
