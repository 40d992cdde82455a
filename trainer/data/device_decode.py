"""Batched JPEG decode and augmentation on the training device (nvJPEG on CUDA).

Why: a CPU decode pipeline cannot feed a modern GPU (DESIGN.md: 1265 samples/s from 15 PIL
workers on a 16-core H100 node, against 3000-3700 samples/s with batched nvJPEG and 2-4 workers).
The loader workers therefore only read shards, parse headers and draw each sample's augmentation
(:class:`~hilum.trainer.data.stream.PendingJpeg`); this module decodes a whole batch in one
``torchvision.io.decode_jpeg`` call on the device and augments the whole batch at once with
:func:`~hilum.trainer.data.augment.apply_params_batch` (the CPU path's crops, filter and factors in a
fixed number of kernels). It runs on CPU tensors as well (libjpeg-turbo), which is how the tests
check both paths agree.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from hilum.trainer.data.augment import AugmentSpec, apply_params_batch

log = logging.getLogger("hilum.data")

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which neither the pinned
# CPU stack nor the GPU image ships; decode_jpeg works on both, so the warning would only be noise.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class DeviceDecoder:
    """Completes batches whose ``jpeg`` entry holds images still to decode (see ``collate_images``).

    ``dtype``: the batch's image dtype (the training dtype saves a cast and half the memory).
    ``max_images``: decoded and augmented at a time, so that the device holds that many decoded
    images however large the batch: GradCache's per-rank batches run to tens of thousands, and
    65 536 JPEGs of 512² take 17 GB decoded, 69 GB as floats.
    ``to_host``: the finished batch goes to host memory (page-locked on CUDA) instead of staying on
    the device, for GradCache, which moves one chunk at a time to the device (65 536 grey 224²
    images are 6.6 GB in bf16, 20 GB with three channels).
    """

    def __init__(self, spec: AugmentSpec, in_chans: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 max_images: int = 512, to_host: bool = False) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.spec, self.in_chans, self.device, self.dtype = spec, in_chans, device, dtype
        self.max_images, self.to_host = max_images, to_host

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pending = batch.pop("jpeg", None)
        if pending is None:
            return batch
        # collate_images writes a "jpeg" entry only for a batch with at least one pending row
        size, rows, decoded_rows = pending["size"], pending["index"], pending["decoded_rows"]
        views = len(pending["params"][0])
        files = list(torch.split(pending["data"], pending["lengths"]))
        image = None  # (size, views, C, S, S)
        for start in range(0, len(rows), self.max_images):
            part = slice(start, start + self.max_images)
            pixels = self._decode(files[part], rows[part], batch)
            group = torch.stack([self._augment(pixels, [p[view] for p in pending["params"][part]])
                                 for view in range(views)], 1)
            if image is None and len(group) == size and not self.to_host:
                image = group  # the whole batch in one group, where it is wanted: no copy
                break
            if image is None:
                image = self._empty((size, *group.shape[1:]))
            place(image, rows[part], group)
        if decoded_rows:  # some rows were decoded in the worker (PNG, 16-bit, CMYK)
            place(image, decoded_rows, pending["decoded"].to(self.dtype))
        if self.to_host and self.device.type == "cuda":
            # The copies into page-locked memory are asynchronous; the batch leaves this (prefetch)
            # thread as host memory that the training thread reads without a CUDA event.
            torch.cuda.current_stream(self.device).synchronize()
        batch["image"] = image[:, 0]
        if views > 1:
            batch["image_aug"] = image[:, 1:]
        return batch

    def _empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.to_host:
            return torch.empty(shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def _augment(self, pixels: tuple[torch.Tensor, torch.Tensor], params: list) -> torch.Tensor:
        """One view of every decoded image: (n, C, S, S); undecodable images stay mid-grey (0)."""
        images, ok = pixels
        out = apply_params_batch(self.spec, images, params)
        out = torch.where(ok[:, None, None, None], out, torch.zeros((), device=out.device, dtype=out.dtype))
        return out.expand(-1, self.in_chans, -1, -1).to(self.dtype)

    def _decode(self, data: list[torch.Tensor], rows: list[int], batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, H, W) float in [0, 1], each image in its top-left corner, and which ones decoded."""
        try:
            decoded: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.GRAY, device=self.device))
        except RuntimeError:
            decoded = self._decode_one_by_one(data, rows, batch)
        good = [d for d in decoded if d is not None]
        height = max((d.shape[1] for d in good), default=1)
        width = max((d.shape[2] for d in good), default=1)
        if good and len(good) == len(decoded) and all(d.shape[1:] == (height, width) for d in good):
            images = torch.stack(good)[:, 0]
        else:  # sizes differ, or a file failed: pad (the crop weights never reach the padding)
            images = torch.zeros(len(decoded), height, width, dtype=torch.uint8, device=self.device)
            for i, d in enumerate(decoded):
                if d is not None:
                    images[i, : d.shape[1], : d.shape[2]] = d[0]
        ok = torch.tensor([d is not None for d in decoded], device=self.device, dtype=torch.bool)
        return images.float().div_(255.0), ok

    def _decode_one_by_one(self, data: list[torch.Tensor], rows: list[int], batch: dict[str, Any]) -> list[torch.Tensor | None]:
        # One undecodable file fails the batched call. The worker already refused truncated files,
        # so this is rare: decode one by one, and replace a file nothing can decode by a grey
        # image (the batch must keep its size on every rank), counted as `bad_image_replaced`.
        out: list[torch.Tensor | None] = []
        for row, d in zip(rows, data):
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.GRAY, device=self.device))
            except RuntimeError as err:
                key = batch["meta"][row].get("__key__", "?") if "meta" in batch else "?"
                log.warning("sample %s: JPEG does not decode on %s (%s); replaced by a grey image", key, self.device, err)
                skipped = batch.setdefault("_skipped", {})
                skipped["bad_image_replaced"] = skipped.get("bad_image_replaced", 0) + 1
                out.append(None)
        return out


def place(out: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """``out[rows] = values`` across devices; consecutive rows (the usual case) as one slice copy,
    asynchronous from the device into page-locked memory."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        out[rows[0]: rows[0] + len(rows)].copy_(values, non_blocking=True)
    else:
        out.index_copy_(0, torch.tensor(rows, device=out.device), values.to(out.device))
    return out
