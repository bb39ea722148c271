"""Runnable examples of greenqueue (importable from the repository root)."""
