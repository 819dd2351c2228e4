"""Benchmarks behind ``moe-runtime bench``: each returns a JSON-able dict of measured numbers.

Every figure is a ratio against a baseline measured in the same run, never a stored number.
"""

from __future__ import annotations

__all__: list[str] = []
