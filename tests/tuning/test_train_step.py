"""One training step of ESFT, routed LoRA and LoRA on each device against a float64 CPU reference.

Each method is prepared on the CPU and then moved with its trainable modules (as the Trainer moves
``TrainableModel``); a forward + backward on one batch in float32 on the device is compared with:
- ESFT: the stock model in float64 with its expert weights trainable: the arena's gradients are
  exactly those of the selected experts' slices (the arena holds copies of them);
- routed LoRA and LoRA: the same method built identically in float64 on the CPU.
Tolerances: loss rtol 1e-5 (atol 1e-5); gradients atol 1e-3 x the largest reference gradient,
rtol 1e-3. Then one SGD step on the device changes every trained tensor and no frozen one.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.models import find_moe_layers
from moe_runtime.ops import extension_available
from moe_runtime.testing.random_models import build_random_model
from moe_runtime.tuning.esft import ExpertSelection
from moe_runtime.tuning.esft.tuner import prepare_esft
from moe_runtime.tuning.routed_lora import RoutedLoraSettings, prepare_routed_lora
from moe_runtime.tuning.trainer import TrainableModel

pytestmark = pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built")

METHODS = ["esft", "routed-lora", "lora"]
SELECTION = ExpertSelection({0: [1, 4, 6], 1: [2]})


def _prepared(method: str) -> tuple[TrainableModel, dict[str, torch.Tensor]]:
    """The wrapped model (float32, CPU) and its trainable tensors by name."""
    torch.manual_seed(0)  # peft initialises LoRA A from the global generator
    model = build_random_model("qwen2_moe", seed=0, experts_implementation="eager")
    info = find_moe_layers(model)
    if method == "esft":
        arena, _ = prepare_esft(model, info, SELECTION)
        wrapped = TrainableModel(model, arena)
    elif method == "routed-lora":
        wrapped = TrainableModel(
            model, prepare_routed_lora(model, info, RoutedLoraSettings(variant="perft-r"))
        )
    else:
        from peft import get_peft_model

        from moe_runtime.tuning.lora import LoraSettings, lora_config

        wrapped = TrainableModel(get_peft_model(model, lora_config(model, info, LoraSettings(rank=4))))
    return wrapped, {n: p for n, p in wrapped.named_parameters() if p.requires_grad}


def _batch() -> torch.Tensor:
    return torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(1))


def _esft_reference(ids: torch.Tensor) -> tuple[torch.Tensor, dict[tuple[int, int, str], torch.Tensor]]:
    """Loss and the selected experts' gradient slices of the stock model in float64."""
    model = build_random_model("qwen2_moe", seed=0, experts_implementation="eager").to(torch.float64)
    info = find_moe_layers(model)
    model.requires_grad_(False)
    for layer in info.layers:
        layer.experts.requires_grad_(True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {}
    for index, experts in SELECTION.experts.items():
        module = info.by_index(index).experts
        for position, expert in enumerate(experts):
            grads[(index, position, "up")] = module.gate_up_proj.grad[expert]
            grads[(index, position, "down")] = module.down_proj.grad[expert]
    return loss.detach(), grads


def _assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(
        got.detach().cpu().to(torch.float64), want, rtol=1e-3, atol=1e-3 * scale + 1e-12, msg=name
    )


@pytest.mark.parametrize("method", METHODS)
def test_training_step_matches_float64_reference(device, method):
    ids = _batch()
    wrapped, trainable = _prepared(method)
    wrapped.to(device)
    assert all(p.device.type == device for p in wrapped.parameters())
    frozen = {n: p.detach().clone() for n, p in wrapped.named_parameters() if not p.requires_grad}
    loss = wrapped(input_ids=ids.to(device), labels=ids.to(device)).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == device for p in trainable.values())

    if method == "esft":
        want_loss, want = _esft_reference(ids)
        for key, layer_arena in wrapped.extra.layers.items():
            for position in range(len(layer_arena.expert_ids)):
                for part in ("up", "down"):
                    got = getattr(layer_arena, part).grad[position]
                    _assert_grad_close(
                        got, want[(int(key), position, part)], f"layer {key} {part} {position}"
                    )
    else:
        reference, ref_trainable = _prepared(method)
        reference.to(torch.float64)
        want_loss = reference(input_ids=ids, labels=ids).loss
        want_loss.backward()
        for name, param in trainable.items():
            _assert_grad_close(param.grad, ref_trainable[name].grad, name)
    # transformers' loss upcasts logits to float32 at least: both losses are float32 or wider
    torch.testing.assert_close(
        loss.detach().cpu().double(), want_loss.detach().double(), rtol=1e-5, atol=1e-5
    )
    assert max(float(p.grad.abs().max()) for p in trainable.values()) > 0  # the step is not vacuous

    before = {n: p.detach().clone() for n, p in trainable.items()}
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    moved = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert moved == [n for n, p in trainable.items() if bool(p.grad.abs().max() > 0)]
    for name, param in wrapped.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
