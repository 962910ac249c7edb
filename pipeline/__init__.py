"""Attention sampling core (filled in by the core issue)."""
