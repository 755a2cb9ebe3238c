"""Synthetic q, k, v with 3D locality, for measuring how well sparse attention approximates dense.

Every video token at grid position p = (t, y, x) gets, with u = (p - centre) / length_scale,
query features ``[u, 1]`` and key features ``[u, -|u|^2 / 2]``, so that
``q_i . k_j = -|u_i - u_j|^2 / 2 + (terms constant over j)``: a Gaussian locality kernel in
space-time, exactly, scaled to ``sharpness`` in the softmax.  A random rotation per head
(shared by q and k) hides the axes, and Gaussian noise on every coordinate plays the part of
content.  v is a smooth function of p (random Fourier features) plus noise.  Used by
``benchmarks/transformer.py`` and the CPU tests of reordering and compensation.
"""

from __future__ import annotations

import math

import torch

from .gilbert import raster_positions

__all__ = ["local_qkv"]


def local_qkv(
    grid,
    heads: int,
    head_dim: int,
    text_tokens: int = 0,
    batch: int = 1,
    length_scale: float = 4.0,
    sharpness: float = 1.0,
    noise: float = 1.0,
    dtype=torch.float32,
    device="cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [batch, heads, text_tokens + f*h*w, head_dim] in raster order (text first)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pos = torch.from_numpy(raster_positions(grid)).float()  # [N, 3]
    n = pos.shape[0]
    D = head_dim
    if D < 4:
        raise ValueError("head_dim must be >= 4")
    u = (pos - pos.mean(0)) / length_scale
    zeros = torch.zeros(n, D - 4)
    fq = torch.cat([u, torch.ones(n, 1), zeros], 1)
    fk = torch.cat([u, -0.5 * (u * u).sum(1, keepdim=True), zeros], 1)
    W = torch.randn(3, D, generator=g) / (2 * length_scale)
    b = 2 * math.pi * torch.rand(D, generator=g)
    psi = math.sqrt(2.0) * torch.cos(pos @ W + b)  # smooth values, unit variance
    c = math.sqrt(sharpness * math.sqrt(D))  # q.k / sqrt(D) = sharpness * (-|u_i - u_j|^2 / 2 + ...)
    qs, ks, vs = [], [], []
    for _ in range(heads):
        R, _ = torch.linalg.qr(torch.randn(D, D, generator=g))  # the same rotation for q and k
        qs.append(c * (fq @ R) + noise * torch.randn(batch, n, D, generator=g))
        ks.append(c * (fk @ R) + noise * torch.randn(batch, n, D, generator=g))
        vs.append(psi @ R + noise * torch.randn(batch, n, D, generator=g))
    out = []
    for per_head in (qs, ks, vs):
        t = torch.stack(per_head, 1)  # [B, H, N, D]
        if text_tokens:
            t = torch.cat([torch.randn(batch, heads, text_tokens, D, generator=g), t], 2)
        out.append(t.to(device=device, dtype=dtype).contiguous())
    return out[0], out[1], out[2]
