"""Image augmentation, split into drawing parameters and applying them.

The split is what lets CPU decode and GPU decode give the same augmentation: a loader worker
draws a sample's parameters from that sample's own generator (needs only the image's size, read
from its header), and the parameters are applied either right there to the CPU-decoded image or
later, in a batch, to the image decoded on the GPU. Either way a replayed stream augments
identically, which exact resume relies on.

No horizontal flip: reports say "left" and "right", and flipping would make them lie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# Mean/std of 8-bit radiographs mapped to [0, 1]; a fixed affine map, not a data statistic.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


@dataclass(frozen=True)
class AugmentSpec:
    image_size: int
    augment: bool = False
    crop_scale_min: float = 0.8
    brightness: float = 0.0
    contrast: float = 0.0


@dataclass(frozen=True)
class AugmentParams:
    """One sample's crop box (pixels of the decoded image) and intensity factors."""

    top: int
    left: int
    height: int
    width: int
    brightness: float = 1.0
    contrast: float = 1.0


def draw_params(spec: AugmentSpec, height: int, width: int, gen: torch.Generator) -> AugmentParams:
    """The sample's parameters; always five draws from ``gen`` when augmenting, none otherwise."""
    if not spec.augment:
        return AugmentParams(0, 0, height, width)
    u = torch.rand(5, generator=gen).tolist()
    scale = spec.crop_scale_min + (1.0 - spec.crop_scale_min) * u[0]
    side = max(1, int(round((scale * height * width) ** 0.5)))
    ch, cw = min(side, height), min(side, width)
    return AugmentParams(
        top=int(u[1] * (height - ch + 1)),
        left=int(u[2] * (width - cw + 1)),
        height=ch,
        width=cw,
        brightness=1.0 + spec.brightness * (2 * u[3] - 1) if spec.brightness else 1.0,
        contrast=1.0 + spec.contrast * (2 * u[4] - 1) if spec.contrast else 1.0,
    )


def apply_params(spec: AugmentSpec, image: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """(C, H, W) float in [0, 1] → (C, S, S) normalised; runs on whatever device ``image`` is on."""
    # Imported here: torchvision costs 2 s to import, and the processes that only read a
    # checkpoint's stream position (the launcher, `hilum status`) reach this module too.
    from torchvision.transforms.v2 import functional as TF

    size = [spec.image_size, spec.image_size]
    if not spec.augment:
        return (TF.resize(image, size, antialias=True) - PIXEL_MEAN) / PIXEL_STD
    image = TF.resized_crop(image, p.top, p.left, p.height, p.width, size, antialias=True)
    if p.brightness != 1.0:
        image = TF.adjust_brightness(image, p.brightness)
    if p.contrast != 1.0:
        image = TF.adjust_contrast(image, p.contrast)
    return (image.clamp(0.0, 1.0) - PIXEL_MEAN) / PIXEL_STD


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(B, out_size, in_size) rows that crop ``[start, start + length)`` of an axis of ``in_size``
    pixels and resize it to ``out_size`` as ``interpolate(mode="bilinear", antialias=True)`` does.

    The same filter as PyTorch's: output pixel ``i`` centred at ``scale·(i + ½)`` in the crop, a
    triangle of half-width ``max(scale, 1)``, clipped to the crop and normalised. Pixels outside
    the crop weigh exactly zero, so what pads a smaller image in a batch never leaks in.
    """
    start, length = start.double()[:, None, None], length.double()[:, None, None]
    scale = length / out_size
    width = scale.clamp(min=1.0)
    centre = scale * (torch.arange(out_size, dtype=torch.float64, device=start.device)[None, :, None] + 0.5)
    pixel = torch.arange(in_size, dtype=torch.float64, device=start.device)[None, None, :] - start
    weights = (1.0 - ((pixel + 0.5 - centre) / width).abs()).clamp(min=0.0)
    weights = weights * ((pixel >= 0) & (pixel < length))
    return weights / weights.sum(-1, keepdim=True)


def apply_params_batch(spec: AugmentSpec, images: torch.Tensor, params: Sequence[AugmentParams]) -> torch.Tensor:
    """(B, H, W) float in [0, 1], each image in its top-left corner → (B, 1, S, S) normalised.

    :func:`apply_params` for a whole batch in a fixed number of operations, whatever its size:
    each crop-and-resize is two matrix products with :func:`resize_weights`, the intensity factors
    are per-row tensors. Why: on a GPU the per-image calls cost ~20 kernel launches and Python
    dispatches per image, which capped batched decode far below what nvJPEG delivers. Same
    crops, filter and factors as the per-image path (tested against it).
    """
    device = images.device
    if not params:
        return images.new_zeros(0, 1, spec.image_size, spec.image_size)
    box = torch.tensor([(p.top, p.left, p.height, p.width) for p in params], device=device)
    rows = resize_weights(box[:, 0], box[:, 2], images.shape[1], spec.image_size).to(images.dtype)
    cols = resize_weights(box[:, 1], box[:, 3], images.shape[2], spec.image_size).to(images.dtype)
    out = torch.bmm(torch.bmm(rows, images), cols.transpose(1, 2))
    if spec.augment:
        factors = torch.tensor([(p.brightness, p.contrast) for p in params], device=device, dtype=images.dtype)
        brightness, contrast = factors[:, 0, None, None], factors[:, 1, None, None]
        out = (out * brightness).clamp_(0.0, 1.0)  # adjust_brightness
        mean = out.mean(dim=(1, 2), keepdim=True)
        out = (out * contrast + mean * (1.0 - contrast)).clamp_(0.0, 1.0)  # adjust_contrast
    return ((out.clamp_(0.0, 1.0) - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)
