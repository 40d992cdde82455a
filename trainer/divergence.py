"""MLIP's divergence encoders (Li et al. 2024, §3.2, Eq. 6-7): after each optimizer step,
θ_o ← s · θ_f + (1 − s) · θ_o per tower, with s the cosine similarity between the encoder's
feature and its divergence encoder's feature.

The paper writes s_v = cosine(v_i, v_aug_i) per sample, but an update of shared parameters takes
one number per step: hilum uses the mean over the *global* batch (each rank's mean, all-reduced:
the only communication the update needs), clamped to [0, 1] so that a negative cosine early in
training cannot extrapolate the parameters. v is the encoder's feature of the clean view, v_aug
the divergence encoder's feature of the randomly transformed view (x_rt), t and t_aug the two
text encoders' features of the same report. The update itself is
:class:`hilum.trainer.moving_average.MovingAverage`: in place, on each rank's own ZeRO partition.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hilum.trainer.moving_average import MovingAverage


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the global batch of the row-wise cosine similarity (every rank gets the same value)."""
    cos = torch.nn.functional.cosine_similarity(a.detach().float(), b.detach().float(), dim=-1)
    stats = torch.stack([cos.sum(), torch.tensor(float(cos.numel()), device=cos.device)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / stats[1]).float()


class DivergenceEncoders:
    """The image and text moving averages of a model with divergence encoders."""

    def __init__(self, model: Any, zero_config: dict[str, Any] | None = None) -> None:
        self.averages = {tower: MovingAverage(source, target, zero_config)
                         for tower, (source, target) in model.divergence_pairs().items()}
        self.last: dict[str, float] = {}

    def similarities(self, image: torch.Tensor, text: torch.Tensor, image_aug: torch.Tensor,
                     text_aug: torch.Tensor) -> dict[str, float]:
        """s per tower for this step (collective: every rank must call it)."""
        both = torch.stack([mean_cosine(image, image_aug), mean_cosine(text, text_aug)])
        s_image, s_text = both.clamp(0.0, 1.0).tolist()
        return {"image": s_image, "text": s_text}

    def update(self, weights: dict[str, float]) -> None:
        """Eq. 7 for each tower; call after the optimizer step."""
        for tower, weight in weights.items():
            self.averages[tower].update(weight)
        self.last = dict(weights)

    def state_dict(self) -> dict[str, Any]:
        return {tower: avg.state_dict() for tower, avg in self.averages.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for tower, avg in self.averages.items():
            avg.load_state_dict(state.get(tower, {}))
