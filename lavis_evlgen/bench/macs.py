"""Multiply-accumulates (MACs) of one forward pass, counted two ways.

- ``linear_macs``: nn.Linear layers only (in_features x out_features per token), the paper's count.
- ``total_macs``: every op torch's ``FlopCounterMode`` has a formula for (matmuls of Linear layers
  and attention scores/values, convolutions), FLOPs / 2. Element-wise ops (softmax, LayerNorm, GELU,
  the ToMe gather/scatter) have no formula there and count zero; they are a small share of the work.
  torch has no formula for its CPU attention kernel (TomeFormer's ``scaled_dot_product_attention``
  on CPU), so one is added from torch's own ``sdpa_flop_count``.
"""
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lavis_evlgen.bench.connectors import ConnectorCall


def linear_macs(scope: nn.Module, run: Callable[[], Any]) -> int:
    """MACs of the nn.Linear layers inside ``scope`` during ``run()`` (every call of each layer)."""
    total = 0

    def count(module: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += inputs[0].numel() // module.in_features * module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in scope.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return total


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU attention kernel: QK^T and attention x V, as torch counts its CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


MISSING_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def total_macs(run: Callable[[], Any]) -> int:
    """MACs of every op ``FlopCounterMode`` counts during ``run()`` (its FLOPs / 2).

    Runs with autograd on: the counter's module tracker fails on no-grad views of parameters (the
    Q-Former's expanded queries). Only the forward is run, so only forward ops are counted.
    """
    with FlopCounterMode(display=False, custom_mapping=MISSING_FORMULAS) as counter:
        run()
    return counter.get_total_flops() // 2


def connector_macs(call: ConnectorCall) -> dict[str, float]:
    """{"linear", "total"}: MACs per sample of a connector call (the call's batch divided out).

    The total is counted on a second run of the same call; the two counts see the same shapes.
    """
    return {"linear": linear_macs(call.scope, call.run) / call.batch, "total": total_macs(call.run) / call.batch}
