"""Helpers that test modules share: plain modules, imported by name (never a test module)."""
