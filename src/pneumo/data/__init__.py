"""Chest X-ray data as the domain sees it: folders, classes, patients, splits, checks, one preprocessing path."""
