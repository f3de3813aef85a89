"""Disentanglement measures for MeDUET factors where the truth is known (synthetic phantoms).

- Linear-probe domain accuracy: a multinomial logistic regression (torch, L-BFGS, standardised
  features, L2 penalty) predicts the domain of a volume from its global content vector and, in a
  separate probe, from its global style vector. Train/test splits are by subject (anatomy), so a
  probe cannot succeed by recognising an anatomy it has seen. Content should be near chance
  (domain-invariant), style near 1 (domain-specific).
- Swap error: the anatomy of A rendered in the style of B is known (phantoms rendered in every
  style). The swap "content of A, style of B" is compared with that ground truth by mean squared
  error, next to the two trivial answers (A unchanged; B unchanged) and the decoder's own
  reconstruction of the ground truth (content and style of the ground truth itself: the floor).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["fit_logistic_regression", "group_kfold", "probe_accuracy", "mse"]


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-2, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS, deterministic).

    Args:
        x: (N, D) features.
        y: (N,) class indices in [0, n_classes).
        n_classes: number of classes.
        l2: penalty on the weights (mean cross-entropy + l2 * ||W||^2).
        max_iter: L-BFGS iterations.

    Returns:
        (weight (D, K), bias (K,), feature mean (D,), feature std (D,)).
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    target = y.long()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, target) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def group_kfold(groups: Sequence[object], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds over distinct groups (every group's items fall in one test fold), in sorted group order.

    Returns:
        ``[(train_indices, test_indices), ...]``.
    """
    groups = np.asarray([str(g) for g in groups])
    names = sorted(set(groups.tolist()))
    k = min(k, len(names))
    if k < 2:
        raise ValueError(f"a split by subject needs at least 2 subjects, got {len(names)}")
    folds = []
    for f in range(k):
        test_names = set(names[f::k])
        test = np.flatnonzero([g in test_names for g in groups])
        train = np.flatnonzero([g not in test_names for g in groups])
        folds.append((train, test))
    return folds


def probe_accuracy(
    features: torch.Tensor, labels: Sequence[int], groups: Sequence[object], n_classes: int, k: int = 4, l2: float = 1e-2
) -> dict[str, float]:
    """Domain accuracy of a linear probe, cross-validated with folds split by subject.

    Args:
        features: (N, D) one vector per volume.
        labels: (N,) domain index per volume.
        groups: (N,) subject (anatomy) id per volume.
        n_classes: number of domains.
        k: folds.
        l2: probe penalty.

    Returns:
        ``{"accuracy": test accuracy over all folds, "chance": majority-class rate, "folds": k}``.
    """
    y = torch.as_tensor(list(labels), dtype=torch.long)
    correct = 0
    total = 0
    folds = group_kfold(groups, k)
    for train, test in folds:
        w, b, mean, std = fit_logistic_regression(features[train], y[train], n_classes, l2)
        pred = (((features[test].double() - mean) / std) @ w + b).argmax(1)
        correct += int((pred == y[test]).sum())
        total += len(test)
    counts = np.bincount(y.numpy(), minlength=n_classes)
    return {"accuracy": correct / total, "chance": float(counts.max() / counts.sum()), "folds": len(folds)}


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error between two tensors of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.float() - b.float()).pow(2).mean())
