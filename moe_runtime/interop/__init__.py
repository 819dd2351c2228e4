"""Bridges to the ecosystem: merged checkpoints (``export``) and adapter format conversion (``convert``)."""

from __future__ import annotations

from .export import export_merged

__all__ = ["export_merged"]
