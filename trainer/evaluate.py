"""Held-out evaluation: zero-shot classification of findings and image↔report retrieval.

Every rank runs the same forwards over the whole eval manifest (it is small) so that ZeRO-3,
whose forward gathers parameters collectively, needs no special case; rank 0 writes the result.

Retrieval counts a hit when a retrieved report's text equals the query's own report: many
reports are word-for-word identical ("No acute cardiopulmonary process."), and ranking one copy
above another is no error.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hilum.trainer.data.shards import Manifest
from hilum.trainer.data.stream import Preprocess, ShardStream, StreamSpec, make_loader


@torch.no_grad()
def encode_manifest(
    model: Any,
    manifest: Manifest,
    preprocess: Preprocess,
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    max_samples: int = 0,
    storage_options: dict[str, Any] | None = None,
    read_ahead_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[dict[str, Any]]]:
    spec = StreamSpec(batch_size=batch_size, world_size=1, num_workers=0, shuffle=False)
    stream = ShardStream(manifest, spec, preprocess, tokenize, storage_options=storage_options,
                         read_ahead_bytes=read_ahead_bytes)
    images, texts, reports, metas = [], [], [], []
    seen = 0
    total = min(manifest.num_samples, max_samples) if max_samples else manifest.num_samples
    # A progress bar on an interactive terminal only (tqdm's disable=None), on the first rank.
    show = not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0)
    bar = tqdm(total=total, desc="eval", unit="sample", disable=None if show else True, leave=False)
    for batch in make_loader(stream):
        bar.update(len(batch["text"]))
        out = model({"image": batch["image"].to(device, dtype), "input_ids": batch["input_ids"].to(device),
                     "attention_mask": batch["attention_mask"].to(device)}, with_parts=False)
        images.append(out["image"].float().cpu())
        texts.append(out["text"].float().cpu())
        reports.extend(batch["text"])
        metas.extend(batch["meta"])
        seen += len(batch["text"])
        if max_samples and seen >= max_samples:
            break
    bar.close()
    n = min(seen, max_samples) if max_samples else seen
    return torch.cat(images)[:n], torch.cat(texts)[:n], reports[:n], metas[:n]


@torch.no_grad()
def class_embeddings(
    model: Any,
    prompts: dict[str, list[str]],
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
    device: torch.device,
) -> torch.Tensor:
    """One unit vector per class: the mean of its prompts' embeddings (CLIP's prompt ensembling)."""
    rows = []
    for name, texts in prompts.items():
        if not texts:
            raise ValueError(f"eval.zero_shot.prompts.{name}: needs at least one prompt")
        tok = tokenize(list(texts))
        emb = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu()
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def zero_shot_metrics(image_emb: torch.Tensor, class_emb: torch.Tensor, classes: list[str], metas: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy on the samples with exactly one positive class among ``classes``."""
    keep, truth = [], []
    for i, meta in enumerate(metas):
        labels = meta.get("labels") or {}
        positive = [c for c in classes if int(labels.get(c, 0)) == 1]
        if len(positive) == 1:
            keep.append(i)
            truth.append(classes.index(positive[0]))
    if not keep:
        return {"samples": 0}
    pred = (image_emb[keep] @ class_emb.T).argmax(dim=1)
    truth_t = torch.tensor(truth)
    correct = pred == truth_t
    per_class = {}
    for c, name in enumerate(classes):
        mask = truth_t == c
        if mask.any():
            per_class[name] = {"samples": int(mask.sum()), "recall": float(correct[mask].float().mean())}
    return {
        "samples": len(keep),
        "accuracy": float(correct.float().mean()),
        "balanced_accuracy": sum(v["recall"] for v in per_class.values()) / len(per_class),
        "chance": 1.0 / len(classes),
        "per_class": per_class,
    }


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, reports: list[str], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    ids = {t: i for i, t in enumerate(dict.fromkeys(reports))}
    report_id = torch.tensor([ids[t] for t in reports])
    sim = image_emb @ text_emb.T
    out: dict[str, float] = {}
    for direction, scores in (("image_to_text", sim), ("text_to_image", sim.T)):
        top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
        hit = report_id[top] == report_id[:, None]
        for k in ks:
            out[f"{direction}_R@{k}"] = float(hit[:, :k].any(dim=1).float().mean())
    return out


def evaluate(
    model: Any,
    manifest: Manifest,
    preprocess: Preprocess,
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
    prompts: dict[str, list[str]],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    max_samples: int = 0,
    storage_options: dict[str, Any] | None = None,
    read_ahead_bytes: int = 0,
) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    try:
        img, txt, reports, metas = encode_manifest(model, manifest, preprocess, tokenize, batch_size, device, dtype,
                                                   max_samples, storage_options, read_ahead_bytes)
        classes = list(prompts)
        cls = class_embeddings(model, prompts, tokenize, device)
    finally:
        model.train(was_training)
    return {
        "samples": len(reports),
        "zero_shot": zero_shot_metrics(img, cls, classes, metas),
        "retrieval": retrieval_metrics(img, txt, reports),
    }
