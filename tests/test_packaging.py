"""Our top-level `kernels` package must not look like Hugging Face's `kernels` to transformers."""

from __future__ import annotations

import subprocess
import sys


def test_transformers_does_not_see_or_import_our_kernels():
    code = (
        "import sys, transformers\n"
        "from transformers.utils import is_kernels_available\n"
        "from transformers import BertConfig, BertModel\n"
        "BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))\n"
        "print(is_kernels_available(), 'kernels' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["False", "False"]


def test_our_kernels_is_the_one_installed_with_hilum():
    import importlib.metadata

    import kernels

    assert hasattr(kernels, "infonce_loss")
    assert "hilum" in importlib.metadata.packages_distributions().get("kernels", [])
