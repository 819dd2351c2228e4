"""All routed-LoRA layers of one adapter, plugged into a model through the experts hook.

    experts hook of layer l:  stock experts(hidden, top_k_index, top_k_weights)   (frozen)
                              + LoraLayer_l(hidden, top_k_index, top_k_weights)   (this adapter)

Shared experts and everything outside the experts module are untouched. The same
:class:`RoutedLora` serves three uses: training (attached, parameters trainable, balance losses
collected), ``eval`` (attached to a fresh base model) and serving (not attached; the serving
executor calls :meth:`RoutedLora.layer` for the rows of this adapter only).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ...models import MoEModelInfo, install, state_of
from .config import ROUTED, LayerPlan, RoutedLoraSettings
from .layer import LoraLayer, TopKRouting

__all__ = ["RoutedLora", "tensor_key"]

_TENSORS = ("lora_A", "lora_B", "router")


def tensor_key(info: MoEModelInfo, layer: int, name: str) -> str:
    """File key of one tensor: ``<experts module>.routed_lora.{lora_A,lora_B,router}``."""
    return f"{info.by_index(layer).experts_name}.routed_lora.{name}"


class RoutedLora(nn.Module):
    """One routed-LoRA adapter over a model's MoE layers.

    Args:
        info: the base model's MoE layers.
        settings: variant, rank, alpha, top-k.
        plans: per layer, the pair count (and expert ids for perft-e / esft-lora).
        dtype, device: of the parameters (the model's).
        seed: initialises A and the router (None: uninitialised, to be loaded).
    """

    def __init__(
        self,
        info: MoEModelInfo,
        settings: RoutedLoraSettings,
        plans: list[LayerPlan],
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.info = info
        self.settings = settings
        self.plans = list(plans)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        routing = None
        if settings.kind == ROUTED:
            make = settings.spec.router
            routing = (
                make(settings)
                if make is not None
                else TopKRouting(settings.effective_top_k(), settings.aux_loss_coef)
            )
        self.layers = nn.ModuleDict(
            {
                str(plan.layer): LoraLayer(
                    kind=settings.kind,
                    plan=plan,
                    hidden_size=info.by_index(plan.layer).hidden_size,
                    num_experts=info.by_index(plan.layer).num_experts,
                    rank=settings.rank,
                    scale=settings.scale,
                    top_k=settings.effective_top_k() if settings.kind == ROUTED else 0,
                    routing=routing,
                    dtype=dtype,
                    device=device,
                    generator=generator,
                )
                for plan in self.plans
            }
        )
        self._by_index: dict[int, LoraLayer] = {int(key): layer for key, layer in self.layers.items()}
        self.token_mask: torch.Tensor | None = None
        self._aux: list[torch.Tensor] = []
        self._attached: list[nn.Module] = []

    def layer(self, index: int) -> LoraLayer | None:
        """The LoRA layer of decoder layer ``index``, or None when it has none."""
        return self._by_index.get(index)

    # attached use (training, eval) ----------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Add this adapter's term to every planned layer's experts (installs the hook if needed)."""
        install(model, self.info)
        for key, lora in self.layers.items():
            experts = self.info.by_index(int(key)).experts
            state_of(experts).executor = functools.partial(self._execute, lora)
            self._attached.append(experts)

    def detach(self) -> None:
        for experts in self._attached:
            state_of(experts).executor = None
        self._attached = []

    def _execute(
        self,
        lora: LoraLayer,
        experts: nn.Module,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        out = state_of(experts).stock(experts, hidden, top_k_index, top_k_weights)
        mask = (
            self.token_mask
            if self.token_mask is not None and self.token_mask.numel() == hidden.shape[0]
            else None
        )
        delta, aux = lora(
            hidden,
            top_k_index,
            top_k_weights,
            token_mask=mask,
            with_aux=self.training and torch.is_grad_enabled(),
        )
        if aux is not None:
            self._aux.append(aux)
        return out + delta.to(out.dtype)

    def pop_aux_loss(self) -> torch.Tensor | None:
        """Mean (weighted) auxiliary loss over the routed layers of the last forward(s), then forget them."""
        aux, self._aux = self._aux, []
        return torch.stack(aux).mean() if aux else None

    # files ----------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by file key (see :func:`tensor_key`), detached, contiguous, on the CPU."""
        out = {}
        for key, lora in self.layers.items():
            for name in _TENSORS:
                value = getattr(lora, name)
                if value is not None:
                    out[tensor_key(self.info, int(key), name)] = value.detach().to("cpu").contiguous()
        return out

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """File key -> shape, for checking a loaded file."""
        return {
            tensor_key(self.info, int(key), name): tuple(getattr(lora, name).shape)
            for key, lora in self.layers.items()
            for name in _TENSORS
            if getattr(lora, name) is not None
        }

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file tensors into the parameters (keys and shapes already checked)."""
        for key, lora in self.layers.items():
            for name in _TENSORS:
                param = getattr(lora, name)
                if param is not None:
                    param.copy_(tensors[tensor_key(self.info, int(key), name)].to(param.dtype))

    def layer_json(self) -> dict[str, dict]:
        """Per-layer plan for the metadata file."""
        out = {}
        for plan in self.plans:
            row: dict = {"num_lora": plan.num_lora}
            if plan.expert_ids:
                row["experts"] = list(plan.expert_ids)
            out[str(plan.layer)] = row
        return out
