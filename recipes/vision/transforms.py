"""Batched image transforms that run where the batch is (GPU or CPU), vectorized over the batch.

Images arrive as uint8 ``[B, C, H, W]``; :func:`prepare_batch` turns them into normalized float32, with the
standard training augmentation (random crop after zero padding, random horizontal flip) when asked. Random
numbers come from torch's global generator on the batch's device (seeded by ``seed_everything``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["channel_stats", "prepare_batch", "random_crop", "random_hflip"]


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Pad every image of ``x`` ``[B, C, H, W]`` with ``padding`` zeros on each side and cut an ``H × W`` window at
    an independent uniformly random offset per image (torchvision's ``RandomCrop(H, padding)`` on a batch)."""
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
    left = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
    rows = (top + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (left + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def random_hflip(x: Tensor) -> Tensor:
    """Mirror each image of ``x`` ``[B, C, H, W]`` left-right with probability ½, independently."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def prepare_batch(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                  crop_padding: int = 0, flip: bool = False) -> Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 ``(x/255 − mean_c) / std_c``, after random crop (``crop_padding`` > 0)
    and random horizontal flip (``flip``). Padding is black (0) before normalization, as in torchvision.
    ``mean``/``std`` given as float32 tensors on the images' device are used without a copy."""
    x = images.float().div_(255.0)
    x = random_crop(x, crop_padding)
    if flip:
        x = random_hflip(x)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images ``[N, C, H, W]`` on the 0..1 scale.

    Computed exactly from a 256-bin histogram per channel, so no float copy of the data set is made.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / (total - 1)
        means.append(mean.item())
        stds.append(var.sqrt().item())
    return tuple(means), tuple(stds)
