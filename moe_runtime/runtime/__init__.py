"""Serving: many ESFT adapters over one shared base model, in mixed batches, in one process."""

from __future__ import annotations

from .arena import ArenaMemory, ExpertArena
from .engine import MultiAdapterEngine, RequestHandle
from .executor import BaseExperts, ResidentExperts, SlotRoutedExecutor, TokenTerm
from .generation import generate_batch
from .profiles import RoutingProfile
from .requests import Completion, DecodeConfig, Request, StreamEvent, read_requests

__all__ = [
    "ArenaMemory",
    "Completion",
    "DecodeConfig",
    "ExpertArena",
    "MultiAdapterEngine",
    "Request",
    "RequestHandle",
    "RoutingProfile",
    "StreamEvent",
    "BaseExperts",
    "ResidentExperts",
    "SlotRoutedExecutor",
    "TokenTerm",
    "generate_batch",
    "read_requests",
]
