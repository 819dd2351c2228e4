"""Routing profiler and ESFT expert selection."""

from __future__ import annotations

from .analysis import format_report, overview
from .recorder import RoutingRecorder
from .run import ProfileConfig, merge_profiles, profile_model, write_profile
from .select import DEFAULT_TOP_P, expert_config, select_experts
from .store import ProfileMeta, TaskProfile, load_profile

__all__ = [
    "DEFAULT_TOP_P",
    "ProfileConfig",
    "ProfileMeta",
    "RoutingRecorder",
    "TaskProfile",
    "expert_config",
    "format_report",
    "load_profile",
    "merge_profiles",
    "overview",
    "profile_model",
    "select_experts",
    "write_profile",
]
