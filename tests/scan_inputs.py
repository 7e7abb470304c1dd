"""Random tree-scan inputs shared by the tree and kernel tests."""

from __future__ import annotations

import torch


def random_inputs(batch, d, n, length, dtype=torch.float64, seed=0, device="cpu"):
    """u, delta (after softplus), A (negative), B, C drawn in float64, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    u = torch.randn(batch, d, length, generator=g, dtype=f64)
    delta = torch.nn.functional.softplus(torch.randn(batch, d, length, generator=g, dtype=f64))
    A = -torch.exp(torch.randn(d, n, generator=g, dtype=f64) * 0.5)
    B = torch.randn(batch, n, length, generator=g, dtype=f64)
    C = torch.randn(batch, n, length, generator=g, dtype=f64)
    return [x.to(device=device, dtype=dtype) for x in (u, delta, A, B, C)]
