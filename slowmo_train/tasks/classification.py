"""Loss and evaluation shared by the image-classification tasks (CIFAR-10, ImageNet)."""

from __future__ import annotations

import torch
from torch import nn

from slowmo_train import control


def classification_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy of an ``(inputs, labels)`` batch; the unit count is the number of samples."""
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs), labels), labels.shape[0]


def evaluate_classifier(model: nn.Module, batches, topk: tuple[int, ...] = (1,)) -> dict[str, float]:
    """Top-k accuracies (%, keys ``top1``, ``top5``, ...) and mean cross-entropy over every rank's
    share of a split (collective). Sums stay on the device until one read at the end, then one
    control all-reduce of the host totals."""
    was_training = model.training
    model.eval()
    totals = None  # loss sum, count, correct@k...
    with torch.no_grad():
        for x, y in batches:
            logits = model(x).float()
            k = min(max(topk), logits.shape[1])
            hits = logits.topk(k, dim=1).indices == y[:, None]
            batch = torch.stack(
                [
                    nn.functional.cross_entropy(logits, y, reduction="sum"),
                    torch.tensor(float(y.numel()), device=logits.device),
                    *[hits[:, : min(t, k)].any(1).sum().float() for t in topk],
                ]
            ).double()
            totals = batch if totals is None else totals + batch
    if totals is None:
        totals = torch.zeros(2 + len(topk), dtype=torch.float64, device=next(model.parameters()).device)
    model.train(was_training)
    loss, count, *correct = control.all_reduce(totals.cpu())
    out = {f"top{t}": 100.0 * c / max(count, 1) for t, c in zip(topk, correct)}
    out["loss"] = loss / max(count, 1)
    return out
