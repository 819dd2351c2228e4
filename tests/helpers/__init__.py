"""Helpers shared by the tests (on the path through ``pythonpath`` in pyproject's pytest settings)."""
