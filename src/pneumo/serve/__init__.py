"""The web page and JSON API that read one X-ray at a time."""
