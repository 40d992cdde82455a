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

import torch
from torchvision.transforms.v2 import functional as TF

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
    size = [spec.image_size, spec.image_size]
    if not spec.augment:
        return (TF.resize(image, size, antialias=True) - PIXEL_MEAN) / PIXEL_STD
    image = TF.resized_crop(image, p.top, p.left, p.height, p.width, size, antialias=True)
    if p.brightness != 1.0:
        image = TF.adjust_brightness(image, p.brightness)
    if p.contrast != 1.0:
        image = TF.adjust_contrast(image, p.contrast)
    return (image.clamp(0.0, 1.0) - PIXEL_MEAN) / PIXEL_STD
