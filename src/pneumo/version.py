"""The package version, in the bottom layer so that any module may quote it without importing the root."""

__version__ = "0.1.0"
