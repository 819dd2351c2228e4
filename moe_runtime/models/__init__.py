"""The model-family layer: find MoE layers in any transformers v5 model and plug into them."""

from __future__ import annotations

from .discovery import ExpertsLayout, MoELayer, MoEModelInfo, find_moe_layers
from .families import UNPADDED_FAMILIES
from .fingerprint import fingerprint_tensors, model_fingerprint
from .hook import IMPLEMENTATION, ExpertsState, install, state_of, uninstall
from .loading import (
    COMPUTE_DTYPES,
    compute_dtype,
    load_model,
    load_tokenizer,
    pad_token_id,
    resolve_model_path,
    stored_dtype,
)
from .weights import expert_tensor_names, merge_expert, split_expert

__all__ = [
    "COMPUTE_DTYPES",
    "UNPADDED_FAMILIES",
    "ExpertsLayout",
    "ExpertsState",
    "IMPLEMENTATION",
    "MoELayer",
    "MoEModelInfo",
    "compute_dtype",
    "expert_tensor_names",
    "find_moe_layers",
    "fingerprint_tensors",
    "install",
    "load_model",
    "load_tokenizer",
    "merge_expert",
    "model_fingerprint",
    "pad_token_id",
    "resolve_model_path",
    "split_expert",
    "state_of",
    "stored_dtype",
    "uninstall",
]
