"""Figures a clinician asks for, as pure functions over predictions; no model code here."""
