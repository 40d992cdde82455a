"""Device decode (batched decode_jpeg + the same augmentation) against the CPU path.

On CPU machines the device path runs with device=cpu (libjpeg-turbo through torchvision); on a
CUDA machine the same test also runs on the GPU (nvJPEG)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hilum.launch.config import ConfigError, build_config
from hilum.trainer.data.augment import PIXEL_MEAN, PIXEL_STD, AugmentSpec
from hilum.trainer.data.device_decode import DeviceDecoder
from hilum.trainer.data.shards import load_manifest, write_shards
from hilum.trainer.data.stream import Preprocess, ShardStream, StreamSpec, make_loader
from tests.test_stream import FakeTokenize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def mixed_samples(n: int):
    """Grey and colour JPEGs of awkward sizes, 8-bit and 16-bit PNGs, and one truncated JPEG."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 37 + 7 * (i % 5), 53 + 11 * (i % 3)
        smooth = np.cumsum(rng.integers(-6, 7, (h, w)), axis=1)  # JPEG-friendly structure
        grey = np.clip(128 + smooth, 0, 255).astype(np.uint8)
        kind = i % 6
        if kind == 3:
            image = {"jpg": _encoded(np.stack([grey, grey // 2, 255 - grey], -1), "JPEG")}
        elif kind == 4:
            image = {"png": _encoded(grey, "PNG")}
        elif kind == 5:
            image = {"png": _encoded((grey.astype(np.uint16) * 257), "PNG")}
        else:
            image = {"jpg": _encoded(grey, "JPEG")}
        if i == 7:
            image = {"jpg": image["jpg"][: len(image["jpg"]) // 2]}
        yield {"__key__": f"m{i:04d}", **image, "json": {"findings": f"finding {i}.", "impression": "x."}}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    write_shards(mixed_samples(48), str(out), "train", samples_per_shard=16)
    return load_manifest(str(out / "train.json"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_chans,views", [(1, 1), (3, 1), (1, 2)])
def test_device_decode_gives_the_cpu_path_images(manifest, device, in_chans, views):
    spec = StreamSpec(batch_size=8, world_size=1, num_workers=0, seed=3)
    common = dict(image_size=24, in_chans=in_chans, augment=True, crop_scale_min=0.5, brightness=0.2, contrast=0.2,
                  views=views)
    cpu_pre, dev_pre = Preprocess(**common), Preprocess(**common, defer_jpeg=True)
    cpu = list(make_loader(ShardStream(manifest, spec, cpu_pre, FakeTokenize())))
    deferred = list(make_loader(ShardStream(manifest, spec, dev_pre, FakeTokenize())))
    decode = DeviceDecoder(dev_pre.augment_spec, in_chans, torch.device(device))
    assert all("jpeg" in b for b in deferred)
    for a, b in zip(cpu, deferred):
        b = decode(b)
        assert [m["__key__"] for m in a["meta"]] == [m["__key__"] for m in b["meta"]]
        assert a["_skipped"] == b["_skipped"]
        assert b["image"].device.type == device and b["image"].shape == a["image"].shape == (8, in_chans, 24, 24)
        # Same crops and factors; only the decoders' rounding (and colour→grey weights) differ.
        for name in ("image", "image_aug") if views > 1 else ("image",):
            diff = (a[name] - b[name].cpu()).abs() * PIXEL_STD * 255
            assert diff.max() <= 3.0 and diff.mean() <= 0.5, name
        if views > 1:
            assert a["image_aug"].shape == (8, 1, in_chans, 24, 24)
            assert (a["image_aug"][:, 0] - a["image"]).abs().amax(dim=(1, 2, 3)).min() > 0.05  # a different view
    assert sum(sum(b["_skipped"].values()) for b in cpu) == 1  # the truncated JPEG, on both paths


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_chans,views", [(3, 1), (1, 2)])
def test_decode_in_groups_to_host_memory_gives_the_same_batch(manifest, device, in_chans, views):
    """GradCache's batches: decoded a few images at a time, finished in (page-locked) host memory."""
    spec = StreamSpec(batch_size=8, world_size=1, num_workers=0, seed=3)
    pre = Preprocess(image_size=24, in_chans=in_chans, augment=True, crop_scale_min=0.5, brightness=0.2, contrast=0.2,
                     views=views, defer_jpeg=True)
    batches = list(make_loader(ShardStream(manifest, spec, pre, FakeTokenize())))
    whole = DeviceDecoder(pre.augment_spec, in_chans, torch.device(device))
    grouped = DeviceDecoder(pre.augment_spec, in_chans, torch.device(device), max_images=3, to_host=True)
    gaps = 0
    for b in batches:
        rows = b["jpeg"]["index"]
        gaps += rows != list(range(rows[0], rows[0] + len(rows)))  # rows decoded in the worker between them
        want, got = whole(dict(b)), grouped(dict(b))
        assert got["image"].device.type == "cpu" and got["image"].is_pinned() == (device == "cuda")
        for name in ("image", "image_aug") if views > 1 else ("image",):
            assert got[name].shape == want[name].shape
            torch.testing.assert_close(got[name], want[name].cpu(), rtol=0, atol=1e-5)
    assert gaps and len(batches) > 1  # both the slice copy and the indexed copy ran


def test_truncated_jpeg_is_refused_in_the_worker_not_on_the_device():
    pre = Preprocess(image_size=16, defer_jpeg=True)
    good = _encoded(np.full((20, 30), 90, np.uint8), "JPEG")
    raw = {"__key__": "t", "jpg": good[:-40], "json": b'{"findings": "a b c"}'}
    with pytest.raises(ValueError, match="(?i)truncated") as err:
        pre(raw, torch.Generator())
    assert err.value.reason == "bad_image"


def test_a_jpeg_the_decoder_refuses_is_replaced_grey_and_counted(caplog):
    good = _encoded(np.full((20, 30), 200, np.uint8), "JPEG")
    broken = good[:200] + b"\xff\xd9"  # header intact, end marker present, scan data gone
    from hilum.trainer.data.augment import AugmentParams

    batch = {
        "jpeg": {"size": 2, "index": [0, 1], "data": torch.frombuffer(bytearray(good + broken), dtype=torch.uint8),
                 "lengths": [len(good), len(broken)],
                 "params": [(AugmentParams(0, 0, 20, 30),)] * 2, "decoded_rows": [], "decoded": None},
        "meta": [{"__key__": "good"}, {"__key__": "bad"}],
        "_skipped": {},
    }
    out = DeviceDecoder(AugmentSpec(16), 1, torch.device("cpu"))(batch)
    assert out["_skipped"] == {"bad_image_replaced": 1} and "bad" in caplog.text
    assert torch.allclose(out["image"][0], torch.full((1, 16, 16), (200 / 255 - PIXEL_MEAN) / PIXEL_STD), atol=0.05)
    assert torch.equal(out["image"][1], torch.zeros(1, 16, 16))


def test_gpu_decode_on_a_cpu_device_is_refused_at_launch():
    with pytest.raises(ConfigError, match="data.decode"):
        build_config({"data": {"decode": "gpu"}, "cluster": {"device": "cpu"}})


@pytest.mark.parametrize("augment", [True, False])
def test_batched_augmentation_equals_the_per_image_path(augment):
    """Float64, awkward sizes (crops that shrink and crops that enlarge), and padding that must not
    leak in: the batch gives what torchvision's per-image resized_crop + intensity ops give."""
    from hilum.trainer.data.augment import apply_params, apply_params_batch, draw_params

    g = torch.Generator().manual_seed(1)
    spec = AugmentSpec(24, augment, crop_scale_min=0.3, brightness=0.3, contrast=0.3)
    images = [torch.rand(1, 11 + 9 * i, 71 - 5 * i, generator=g, dtype=torch.float64) for i in range(9)]
    params = [draw_params(spec, x.shape[1], x.shape[2], g) for x in images]
    padded = torch.full((9, max(x.shape[1] for x in images), max(x.shape[2] for x in images)), 9.0, dtype=torch.float64)
    for i, x in enumerate(images):
        padded[i, : x.shape[1], : x.shape[2]] = x[0]
    batch = apply_params_batch(spec, padded, params)
    reference = torch.stack([apply_params(spec, x, p) for x, p in zip(images, params)])
    assert batch.shape == (9, 1, 24, 24)
    torch.testing.assert_close(batch, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode,progressive", [("L", False), ("L", True), ("RGB", False), ("RGB", True), ("CMYK", False)])
def test_jpeg_frame_header_agrees_with_pil(mode, progressive):
    from hilum.trainer.data.stream import jpeg_frame

    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", progressive=progressive, quality=90)
    precision, height, width, components = jpeg_frame(buf.getvalue())
    assert (precision, width, height, components) == (8, *image.size, len(mode))


def test_device_decode_takes_grey_and_colour_8_bit_jpegs_only():
    pre = Preprocess(image_size=16, defer_jpeg=True)
    meta = b'{"findings": "a b c"}'
    rng = np.random.default_rng(3)
    grey = _encoded(rng.integers(0, 255, (20, 30), dtype=np.uint8), "JPEG")
    cmyk = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert("CMYK").save(cmyk, format="JPEG")
    deferred, _, _ = pre({"__key__": "g", "jpg": grey, "json": meta}, torch.Generator())
    on_cpu, _, _ = pre({"__key__": "c", "jpg": cmyk.getvalue(), "json": meta}, torch.Generator())
    assert deferred.params[0].height <= 20 and isinstance(on_cpu, torch.Tensor)
    garbage = b"\xff\xd8\xff\xe0\x00\x04ab" + bytes(50) + b"\xff\xd9"
    with pytest.raises(ValueError, match="frame header") as err:
        pre({"__key__": "x", "jpg": garbage, "json": meta}, torch.Generator())
    assert err.value.reason == "bad_image"
