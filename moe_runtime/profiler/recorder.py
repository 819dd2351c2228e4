"""The routing recorder: an observer attached to every experts module through the one hook.

Per MoE layer it accumulates, over non-padding tokens only:
    counts[l, e]    how many times expert e was selected (any of the top-k slots)
    gate_sums[l, e] the routing weight the experts module received for e, summed
and optionally the per-token expert ids (the trace).
"""

from __future__ import annotations

import torch

from ..models import MoEModelInfo, state_of
from ..models.discovery import MoELayer

__all__ = ["RoutingRecorder"]


class RoutingRecorder:
    """Counts routing decisions of one model while attached.

    Usage::

        recorder = RoutingRecorder(info, trace=False)
        with recorder.attached():
            recorder.set_valid(attention_mask)  # [B, S], before every forward
            model(input_ids, attention_mask=attention_mask)
        recorder.counts  # [L, E] int64

    Args:
        info: the model's MoE layers (``install`` must have run on the model).
        trace: also keep per-token expert ids, one ``[n, K]`` tensor per layer and forward.
    """

    def __init__(self, info: MoEModelInfo, *, trace: bool = False) -> None:
        self.info = info
        self.num_experts = max(layer.num_experts for layer in info.layers)
        self.top_k = info.layers[0].top_k
        self._row = {layer.index: row for row, layer in enumerate(info.layers)}
        n_layers = len(info.layers)
        self.counts = torch.zeros(n_layers, self.num_experts, dtype=torch.int64)
        self.gate_sums = torch.zeros(n_layers, self.num_experts, dtype=torch.float64)
        self.trace = trace
        self.trace_dtype = torch.uint8 if self.num_experts <= 256 else torch.int16
        self._trace_parts: list[list[torch.Tensor]] = [[] for _ in info.layers]
        self._valid: torch.Tensor | None = None

    def set_valid(self, attention_mask: torch.Tensor | None) -> None:
        """Mark which flattened tokens of the next forward are real (``[B, S]`` mask, 1 = real)."""
        self._valid = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def __call__(
        self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> None:
        index, weights = top_k_index, top_k_weights
        if self._valid is not None:
            if self._valid.numel() != index.shape[0]:
                raise RuntimeError(
                    f"layer {layer.index}: experts saw {index.shape[0]} tokens, the batch has {self._valid.numel()}"
                )
            valid = self._valid.to(index.device)
            index, weights = index[valid], weights[valid]
        row = self._row[layer.index]
        flat = index.reshape(-1)
        keep = (flat >= 0) & (flat < layer.num_experts)
        flat = flat[keep]
        self.counts[row] += torch.bincount(flat, minlength=self.num_experts)[: self.num_experts].cpu()
        sums = torch.zeros(self.num_experts, dtype=torch.float64, device=flat.device)
        sums.index_add_(0, flat, weights.reshape(-1)[keep].to(torch.float64))
        self.gate_sums[row] += sums.cpu()
        if self.trace:
            self._trace_parts[row].append(index.to(self.trace_dtype).cpu())

    def attached(self) -> _Attached:
        """Context manager attaching this recorder to every experts module."""
        return _Attached(self)

    def take_trace(self) -> list[torch.Tensor]:
        """Per layer ``[n_tokens, K]`` expert ids recorded since the last call (then cleared)."""
        parts = [
            torch.cat(p) if p else torch.zeros(0, self.top_k, dtype=self.trace_dtype)
            for p in self._trace_parts
        ]
        self._trace_parts = [[] for _ in self.info.layers]
        return parts


class _Attached:
    def __init__(self, recorder: RoutingRecorder) -> None:
        self.recorder = recorder

    def __enter__(self) -> RoutingRecorder:
        for layer in self.recorder.info.layers:
            state_of(layer.experts).observers.append(self.recorder)
        return self.recorder

    def __exit__(self, *exc) -> None:
        for layer in self.recorder.info.layers:
            observers = state_of(layer.experts).observers
            if self.recorder in observers:
                observers.remove(self.recorder)
