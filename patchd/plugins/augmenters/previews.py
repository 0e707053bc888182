"""PNG previews a person looks at: image grids, upscaled so 8-28 px images stay legible."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def upscale(x: torch.Tensor, min_side: int = 56) -> torch.Tensor:
    """Nearest-neighbour upscaling by an integer factor so the short side is >= ``min_side``."""
    factor = max(1, -(-min_side // int(x.shape[-1])))
    return F.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """Write ``images`` [N,C,H,W] in [0,1] as one PNG grid with ``nrow`` images per row."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    grid = upscale(images.detach().cpu().clamp(0, 1))
    save_image(grid, str(path), nrow=max(1, nrow), padding=2, pad_value=1.0)
    return path


def save_triplets(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor, path: Path) -> Path:
    """One row per example: original, F(x), G(x)."""
    rows = torch.stack([x, f, g], dim=1).flatten(0, 1)
    return save_grid(rows, path, nrow=3)
