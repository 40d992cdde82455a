"""Batched JPEG decode and augmentation on the training device (nvJPEG on CUDA).

Why: a CPU decode pipeline cannot feed a modern GPU (DESIGN.md: 1265 samples/s from 15 PIL
workers on a 16-core H100 node, against 3000-3700 samples/s with batched nvJPEG and 2-4 workers).
The loader workers therefore only read shards, parse headers and draw each sample's augmentation
(:class:`~trainer.data.stream.PendingJpeg`); this module decodes a whole batch in one
``torchvision.io.decode_jpeg`` call on the device and applies the same
:func:`~trainer.data.augment.apply_params` the CPU path uses. It runs on CPU tensors as well
(libjpeg-turbo), which is how the tests check both paths agree.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from trainer.data.augment import AugmentSpec, apply_params

log = logging.getLogger("hilum.data")

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which neither the pinned
# CPU stack nor the GPU image ships; decode_jpeg works on both, so the warning would only be noise.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class DeviceDecoder:
    """Completes batches whose ``jpeg`` entry holds images still to decode (see ``collate_images``)."""

    def __init__(self, spec: AugmentSpec, in_chans: int, device: torch.device) -> None:
        self.spec, self.in_chans, self.device = spec, in_chans, device

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pending = batch.pop("jpeg", None)
        if pending is None:
            return batch
        image = batch["image"].to(self.device, non_blocking=True)
        extra = batch["image_aug"].to(self.device, non_blocking=True) if "image_aug" in batch else None
        rows = pending["index"]
        for row, decoded, params in zip(rows, self._decode(pending["data"], rows, batch), pending["params"]):
            if decoded is None:
                continue  # counted in _decode; the row stays mid-grey (0 after normalisation)
            x = decoded.float().div_(255.0)
            if self.in_chans == 3:
                x = x.expand(3, -1, -1)
            image[row] = apply_params(self.spec, x, params[0])
            for view, p in enumerate(params[1:]):
                extra[row, view] = apply_params(self.spec, x, p)
        batch["image"] = image
        if extra is not None:
            batch["image_aug"] = extra
        return batch

    def _decode(self, data: list[torch.Tensor], rows: list[int], batch: dict[str, Any]) -> list[torch.Tensor | None]:
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.GRAY, device=self.device))
        except RuntimeError:
            pass
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

