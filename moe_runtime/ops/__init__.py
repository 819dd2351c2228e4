"""Python faces of the compiled ops, each with a pure-PyTorch reference beside it.

Importing this package neither loads the compiled extension nor touches CUDA; the first op
call loads `moe_runtime._C`.
"""

from __future__ import annotations

from ._extension import extension_available, load_extension
from .experts_mm import Segment, grouped_linear, segmented_experts
from .loader import ExpertLoader, LoaderCancelledError, LoaderError
from .reroute import Rerouted, group_by_slot, reroute_permute, reroute_permute_reference
from .rows_linear import rows_linear, rows_linear_reference, rows_mm_max, streams_rows
from .slot_routed import slot_routed_experts

__all__ = [
    "ExpertLoader",
    "LoaderCancelledError",
    "LoaderError",
    "Rerouted",
    "Segment",
    "extension_available",
    "group_by_slot",
    "grouped_linear",
    "load_extension",
    "reroute_permute",
    "reroute_permute_reference",
    "rows_linear",
    "rows_linear_reference",
    "rows_mm_max",
    "segmented_experts",
    "slot_routed_experts",
    "streams_rows",
]
