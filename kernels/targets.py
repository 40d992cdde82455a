"""Soft targets for InfoNCE that are functions of per-sample data, so no B×B matrix is stored.

A target object describes unnormalised pair weights ``W[i, j]`` between image ``i`` (row) and
text ``j`` (column) of the global batch. The loss normalises them itself (see ``hilum.kernels.infonce``):
``T = W / W.sum(1)`` for image→text and ``T[:, j] / T[:, j].sum()`` for text→image. Because
``W`` is regenerated tile by tile from O(B) per-sample data, the fused kernel and the chunked
reference never hold more than one tile of it.

Each class offers the same three views of ``W``:

* ``weights(rows, cols)``: a dense slice, for the chunked PyTorch path and for tests;
* ``triton_args()``: the mode and tensors the Triton kernel regenerates it from;
* ``gather(group)``: the object for the global batch, built from every rank's local samples.

Weights are computed in float32 or wider. The Triton kernel computes the inner products of
``ReportCorrelationTargets`` in the storage dtype of its embeddings (bf16 embeddings → bf16
products with float32 accumulation), like the logits themselves.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Kernel modes; the Triton kernel switches on these constants.
HARD, DENSE, CORRELATION, LABELS, CORRELATION_PRIOR = 0, 1, 2, 3, 4


def _gather_rows(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


class SoftTargets(ABC):
    """Base of the generated soft targets. ``num_rows``/``num_cols`` are global batch sizes."""

    mode: int
    num_rows: int
    num_cols: int

    @abstractmethod
    def weights(self, rows: slice, cols: slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unnormalised weights of global rows ``rows`` against global columns ``cols``."""

    @abstractmethod
    def triton_args(self) -> tuple[int, tuple[torch.Tensor, ...], float]:
        """(mode, tensors, scalar) for the kernel; see ``hilum.kernels.infonce_triton._target_weights``."""

    @abstractmethod
    def gather(self, group: dist.ProcessGroup | None = None) -> "SoftTargets":
        """The same targets over every rank's samples (rank order)."""

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The row-stochastic target matrix ``T`` (O(B²): tests and small batches only)."""
        w = self.weights(slice(0, self.num_rows), slice(0, self.num_cols), dtype)
        return w / w.sum(dim=1, keepdim=True)


@dataclass(frozen=True, eq=False)
class DenseTargets(SoftTargets):
    """An explicit (N, M) matrix of non-negative-sum rows; it must describe the global batch."""

    matrix: torch.Tensor
    mode = DENSE

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2:
            raise ValueError(f"targets must be a 2-D matrix, got shape {tuple(self.matrix.shape)}")

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.matrix.shape[0]

    @property
    def num_cols(self) -> int:  # type: ignore[override]
        return self.matrix.shape[1]

    def weights(self, rows: slice, cols: slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.matrix[rows, cols].to(dtype)

    def triton_args(self) -> tuple[int, tuple[torch.Tensor, ...], float]:
        return DENSE, (self.matrix.float().contiguous(),), 0.0

    def gather(self, group: dist.ProcessGroup | None = None) -> "DenseTargets":
        return self  # already global: a dense matrix cannot be assembled from row shards cheaply


@dataclass(frozen=True, eq=False)
class ReportCorrelationTargets(SoftTargets):
    """IMITATE's clinical-informed targets (Liu et al., Eq. 3–4).

    ``R`` is the Pearson correlation between the report embeddings of two samples (each
    embedding centred over its own dimensions and L2-normalised), smoothed as
    ``W = 1 − exp(−λ R)`` off the diagonal and 1 on it. Negative correlations give negative
    weights, as in the paper (the exponential kernel "does not convert negative values to
    positive ones"); a row whose weights sum to ≤ 0 is refused by the loss.

    ``form="code"`` gives the authors' public code instead: ``W = lam · max(R, 0)`` off the
    diagonal (the one-hot target plus a non-negative prior scaled by ``lam``, which the code sets
    to the temperature), 1 on it.
    """

    embeddings: torch.Tensor  # (B, E) report embeddings, one per sample; no gradient needed
    lam: float = 0.2
    form: str = "paper"

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2:
            raise ValueError(f"report embeddings must be (B, E), got {tuple(self.embeddings.shape)}")
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0, got {self.lam}")
        if self.form not in ("paper", "code"):
            raise ValueError(f"form must be 'paper' or 'code', got {self.form!r}")

    @property
    def mode(self) -> int:  # type: ignore[override]
        return CORRELATION if self.form == "paper" else CORRELATION_PRIOR

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.embeddings.shape[0]

    num_cols = num_rows  # type: ignore[assignment]

    def unit_centered(self, dtype: torch.dtype | None = None, chunk: int = 8192) -> torch.Tensor:
        """Each embedding centred over its dimensions and L2-normalised, so ``u_i · u_j = R_ij``.

        Computed in float32 or wider a chunk of rows at a time, so the float32 temporaries stay
        small when the result is stored in bf16.
        """
        e = self.embeddings.detach()
        work = torch.promote_types(e.dtype, torch.float32)
        out = torch.empty(e.shape, dtype=dtype or work, device=e.device)
        for i in range(0, e.shape[0], chunk):
            part = e[i : i + chunk].to(work)
            out[i : i + chunk] = F.normalize(part - part.mean(dim=1, keepdim=True), dim=1)
        return out

    def weights(self, rows: slice, cols: slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        u = self.unit_centered(torch.promote_types(dtype, torch.float32))
        r = u[rows] @ u[cols].T
        w = 1.0 - torch.exp(-self.lam * r) if self.form == "paper" else self.lam * r.clamp_min(0.0)
        gi = torch.arange(rows.start, rows.stop, device=w.device)[:, None]
        gj = torch.arange(cols.start, cols.stop, device=w.device)[None, :]
        return torch.where(gi == gj, torch.ones_like(w), w).to(dtype)

    def triton_args(self) -> tuple[int, tuple[torch.Tensor, ...], float]:
        dtype = torch.float32 if self.embeddings.dtype == torch.float64 else self.embeddings.dtype
        return self.mode, (self.unit_centered(dtype).contiguous(),), self.lam

    def gather(self, group: dist.ProcessGroup | None = None) -> "ReportCorrelationTargets":
        return ReportCorrelationTargets(_gather_rows(self.embeddings.detach(), group), self.lam, self.form)


@dataclass(frozen=True, eq=False)
class LabelSimilarityTargets(SoftTargets):
    """MedFILIP's semantic-similarity matrix (Liang et al., Eq. 4–5), from a label vocabulary.

    Image ``i`` carries the structured labels ``row_labels[i]`` and text ``j`` carries
    ``col_labels[j]`` (indices into a vocabulary, ``-1`` for padding). The weight of the pair is
    the largest cosine similarity between any label of one and any label of the other — the
    max-pooling of Eq. 4 — clamped at 0 (the paper's labels range over [0, 1]). With one label per
    text this is MedFILIP's image × label matrix; with label sets on both sides it compares
    two reports' findings. ``similarity`` is the vocabulary's (V, V) cosine table, so a tile costs
    lookups rather than a matrix product.
    """

    similarity: torch.Tensor  # (V, V)
    row_labels: torch.Tensor  # (N, K) int64, -1 = none
    col_labels: torch.Tensor  # (M, L) int64, -1 = none
    mode = LABELS

    def __post_init__(self) -> None:
        v = self.similarity.shape[0]
        if self.similarity.ndim != 2 or self.similarity.shape[1] != v:
            raise ValueError(f"similarity must be (V, V), got {tuple(self.similarity.shape)}")
        for name in ("row_labels", "col_labels"):
            labels = getattr(self, name)
            if labels.ndim != 2 or labels.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be an integer (B, K) tensor, got {labels.dtype} {tuple(labels.shape)}")
            if labels.numel() and (int(labels.max()) >= v or int(labels.min()) < -1):
                raise ValueError(f"{name} holds an index outside [-1, {v - 1}]")
            empty = (labels < 0).all(dim=1).nonzero()
            if empty.numel():
                raise ValueError(f"{name}: sample {int(empty[0])} has no label; give it one (e.g. 'no finding')")

    @classmethod
    def from_label_embeddings(
        cls, label_embeddings: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor | None = None
    ) -> "LabelSimilarityTargets":
        """Eq. 5's cosine similarity of the vocabulary's embeddings (from any sentence encoder)."""
        e = F.normalize(label_embeddings.detach().float(), dim=1)
        return cls((e @ e.T).clamp_min(0.0), row_labels, row_labels if col_labels is None else col_labels)

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.row_labels.shape[0]

    @property
    def num_cols(self) -> int:  # type: ignore[override]
        return self.col_labels.shape[0]

    def weights(self, rows: slice, cols: slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        sim = self.similarity.to(torch.promote_types(dtype, torch.float32))
        a, b = self.row_labels[rows], self.col_labels[cols]
        best = torch.full((a.shape[0], b.shape[0]), -math.inf, dtype=sim.dtype, device=sim.device)
        for k in range(a.shape[1]):
            for l in range(b.shape[1]):
                v = sim[a[:, k].clamp_min(0)][:, b[:, l].clamp_min(0)]
                valid = (a[:, k] >= 0)[:, None] & (b[:, l] >= 0)[None, :]
                best = torch.maximum(best, torch.where(valid, v, torch.full_like(v, -math.inf)))
        return best.clamp_min(0.0).to(dtype)

    def triton_args(self) -> tuple[int, tuple[torch.Tensor, ...], float]:
        return (
            LABELS,
            (self.similarity.float().contiguous(), self.row_labels.to(torch.int32).contiguous(),
             self.col_labels.to(torch.int32).contiguous()),
            0.0,
        )

    def gather(self, group: dist.ProcessGroup | None = None) -> "LabelSimilarityTargets":
        return LabelSimilarityTargets(
            self.similarity, _gather_rows(self.row_labels, group), _gather_rows(self.col_labels, group)
        )
