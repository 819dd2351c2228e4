"""The engine's few-row linear calls: ``rows_linear`` while attached, the class forward after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_runtime.ops import extension_available, rows_mm_max
from moe_runtime.runtime.streamed_linears import StreamedLinears


class _Subclass(nn.Linear):
    pass


@pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built")
def test_attach_routes_few_rows_and_detach_restores(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), _Subclass(30, 20), nn.Linear(20, 10).double())
    streamed = StreamedLinears(model)
    assert streamed.modules == [model[0]]  # exact nn.Linear with float32 CPU weights only
    calls = []
    import moe_runtime.runtime.streamed_linears as module

    real = module.rows_linear_op
    monkeypatch.setattr(module, "rows_linear_op", lambda: lambda *a: calls.append(a[0].shape) or real()(*a))
    few, many = torch.randn(1, 2, 40), torch.randn(rows_mm_max() + 1, 40)
    want_few, want_many = model[0](few), model[0](many)
    streamed.attach()
    with torch.no_grad():
        torch.testing.assert_close(model[0](few), want_few, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[0](many), want_many, rtol=0, atol=0)  # past rows_mm_max(): F.linear
    assert calls == [few.shape]
    model[0](few).sum().backward()  # gradients needed: F.linear
    assert calls == [few.shape] and model[0].weight.grad is not None
    streamed.detach()
    assert "forward" not in model[0].__dict__
