"""Lazy pyramidal slide readers (filled in by the readers issue)."""
