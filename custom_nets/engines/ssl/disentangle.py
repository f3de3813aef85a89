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

from custom_nets.losses.domain_variance import fisher_criterion

__all__ = [
    "fit_logistic_regression",
    "group_kfold",
    "probe_accuracy",
    "probe_scores",
    "between_group_variance_share",
    "domain_fisher",
    "token_map_retrieval",
    "mse",
]


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


def probe_scores(
    features: torch.Tensor, labels: Sequence[int], folds: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int,
    l2: float = 1e-2,
) -> dict[str, float]:
    """Accuracy and cross-validated cross-entropy of a linear probe over given folds.

    The cross-entropy (nats, mean over every held-out item) says how much of the label the
    features give away even where the argmax is right by luck or wrong by a little: chance is
    ln(n_classes) for balanced classes, 0 for a perfect and confident probe.

    Args:
        features: (N, D) one vector per item.
        labels: (N,) class index per item.
        folds: ``[(train_indices, test_indices), ...]`` (e.g. :func:`group_kfold`).
        n_classes: number of classes.
        l2: probe penalty.

    Returns:
        ``{"accuracy", "cross_entropy", "chance" (majority rate), "chance_cross_entropy" (ln K), "folds"}``.
    """
    y = torch.as_tensor(list(labels), dtype=torch.long)
    correct, total, ce = 0, 0, 0.0
    for train, test in folds:
        w, b, mean, std = fit_logistic_regression(features[train], y[train], n_classes, l2)
        logits = ((features[test].double() - mean) / std) @ w + b
        correct += int((logits.argmax(1) == y[test]).sum())
        ce += float(torch.nn.functional.cross_entropy(logits, y[test], reduction="sum"))
        total += len(test)
    counts = np.bincount(y.numpy(), minlength=n_classes)
    return {"accuracy": correct / total, "cross_entropy": ce / total, "chance": float(counts.max() / counts.sum()),
            "chance_cross_entropy": float(np.log(n_classes)), "folds": len(folds)}


def between_group_variance_share(features: torch.Tensor, groups: Sequence[object]) -> float:
    """Share of the variance that lies between groups (eta squared), averaged over standardised features.

    For each feature, var(group means weighted by group size) / total variance; 1 when every
    feature is constant within groups, ~0 when group means coincide. Features are weighed equally.

    Args:
        features: (N, D).
        groups: (N,) group (e.g. domain) of each row.

    Returns:
        mean over features with non-zero variance of the between-group share.
    """
    x = features.double()
    g = np.asarray([str(v) for v in groups])
    total = x.var(0, unbiased=False)
    between = torch.zeros_like(total)
    mean = x.mean(0)
    for name in sorted(set(g.tolist())):
        idx = torch.as_tensor(np.flatnonzero(g == name))
        between += len(idx) / len(g) * (x[idx].mean(0) - mean).pow(2)
    keep = total > 1e-12
    return float((between[keep] / total[keep]).mean()) if bool(keep.any()) else 0.0


def domain_fisher(features: torch.Tensor, groups: Sequence[object], shrinkage: float = 0.1) -> float:
    """Fisher criterion of the groups' means: (1/D) sum_k pi_k (mu_k - mu)^T W_s^{-1} (mu_k - mu).

    ``W`` is the pooled within-group covariance, shrunk towards its mean variance
    (``W_s = (1 - s) W + s (tr W / D) I``), ``pi_k`` uniform over the groups. It is the quantity the
    ``domain_mean_weight`` training loss (:class:`~custom_nets.losses.domain_variance.DomainMeanBank`)
    lowers, measured on given features; it does not change with their scale. About 0 when the group
    means coincide; what a linear probe separates grows with D times it.

    Args:
        features: (N, D).
        groups: (N,) group (e.g. domain) of each row.
        shrinkage: s above, in (0, 1].

    Returns:
        the criterion (>= 0); 0 with fewer than two groups.
    """
    x = features.double()
    g = np.asarray([str(v) for v in groups])
    names = sorted(set(g.tolist()))
    if len(names) < 2:
        return 0.0
    index = [torch.as_tensor(np.flatnonzero(g == n)) for n in names]
    means = torch.stack([x[i].mean(0) for i in index])
    centred = torch.cat([x[i] - m for i, m in zip(index, means)])
    pi = torch.full((len(names),), 1.0 / len(names), dtype=x.dtype)
    value, _ = fisher_criterion(means, pi, centred.T @ centred / len(x), shrinkage)
    return float(value)


def token_map_retrieval(
    maps: torch.Tensor, anatomy: Sequence[object], style: Sequence[object], candidates: int = 8
) -> dict[str, float]:
    """Top-1 retrieval of an anatomy across styles from token maps.

    Each map is standardised per channel over its tokens (removing volume-wide offsets and scales,
    the simplest style) and flattened; for a query (anatomy a, style s) and each other style t,
    the candidates are the maps in style t of a's group of ``candidates`` anatomies (anatomies in
    sorted order cut into consecutive groups); a hit when a's own map has the highest cosine.

    Args:
        maps: (N, C, gx, gy, gz) token maps.
        anatomy: (N,) anatomy id per map.
        style: (N,) style per map.
        candidates: anatomies per candidate set (chance 1 / candidates).

    Returns:
        ``{"accuracy", "chance", "queries"}``.
    """
    x = maps.double().flatten(2)
    x = (x - x.mean(2, keepdim=True)) / x.std(2, keepdim=True, unbiased=False).clamp_min(1e-8)
    x = torch.nn.functional.normalize(x.flatten(1), dim=1)
    anat = [str(a) for a in anatomy]
    sty = [str(s) for s in style]
    names = sorted(set(anat))
    if len(names) < candidates:
        raise ValueError(f"{len(names)} anatomies cannot fill candidate sets of {candidates}")
    group_of = {n: i // candidates for i, n in enumerate(names[: len(names) // candidates * candidates])}
    index = {(a, s): i for i, (a, s) in enumerate(zip(anat, sty))}
    hits = queries = 0
    for i, (a, s) in enumerate(zip(anat, sty)):
        if a not in group_of:
            continue
        group = [n for n in names if group_of.get(n) == group_of[a]]
        for t in sorted(set(sty) - {s}):
            cand = [index[(n, t)] for n in group if (n, t) in index]
            if (a, t) not in index or len(cand) < 2:
                continue
            sims = x[cand] @ x[i]
            hits += int(cand[int(sims.argmax())] == index[(a, t)])
            queries += 1
    return {"accuracy": hits / max(1, queries), "chance": 1.0 / candidates, "queries": queries}


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error between two tensors of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.float() - b.float()).pow(2).mean())
