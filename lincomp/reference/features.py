"""Feature maps phi of the linear branch (docs/semantics.md section 2), plain PyTorch."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def feature_map(name: str, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """phi(x) for x [B, H, L, D] (weight [H, D, E] for hedgehog maps) -> [B, H, L, F]."""
    if name == "identity":
        return x
    if name == "elu1":
        return F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    proj = torch.einsum("bhld,hde->bhle", x, weight.to(x.dtype))
    if name == "hedgehog":
        return torch.cat([torch.softmax(proj, -1), torch.softmax(-proj, -1)], -1)
    if name == "hedgehog_exp":
        return torch.cat([torch.exp(proj), torch.exp(-proj)], -1)
    raise ValueError(f"unknown feature map {name!r}")
