"""Batch samplers that decide which volumes MeDUET mixes with which.

MeDUET mixes item ``i`` of a batch with item ``B-1-i`` (the batch reversed). With plain random
batches the two partners often come from the same domain (site), so the demixing task gives the
network no reason to separate site appearance from anatomy. :class:`PairBatchSampler` with
``pairing="cross_domain"`` arranges every batch so that the partners ``i`` and ``B-1-i`` come
from different domains whenever the data allow it; ``pairing="random"`` is the authors' choice
(random batches).

Cross-domain pairing, per epoch:
1. Draw pairs of distinct domains at random, with probability proportional to the number of
   items each domain still has. A domain that holds at least half of the remaining items must
   take part in the next pair; otherwise it could be left alone at the end. This pairs every item
   across domains whenever no domain holds more than half of the items, and otherwise gives the
   largest possible number of cross-domain pairs.
2. Fallback: items left when only one domain remains are paired with each other (same-domain
   pairs), so every item is still used once per epoch. With a single domain in the data all pairs
   are same-domain (cross-domain pairing is then the same as random pairing).
3. Shuffle the pairs and lay each group of ``B/2`` pairs out as ``[a_1 .. a_{B/2}, b_{B/2} .. b_1]``
   so that pair ``k`` sits at positions ``k`` and ``B-1-k``.

Epoch size: ``max(len(dataset), batch_size * num_replicas)`` items (a dataset smaller than one
batch per process is repeated, never yielding an empty epoch); the last partial batch is dropped.

Distributed training: every process draws the same global list of batches (same seed and
epoch) and takes every ``num_replicas``-th one, so each process gets whole batches and the pairing
property holds on every process. The list is padded by wrapping around to a multiple of
``num_replicas`` so all processes run the same number of steps (as ``DistributedSampler`` does).
Call :meth:`PairBatchSampler.set_epoch` at the start of every epoch to draw new pairs (the
meduet_ssl bundle attaches :class:`custom_nets.engines.ssl.train.SamplerEpoch` for this; MONAI
itself only does it for ``DistributedSampler``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

PAIRINGS = ("random", "cross_domain")


def cross_domain_pairs(domains: Sequence[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pair up item indices so that as many pairs as possible join two different domains.

    Args:
        domains: domain index of every item (position = item index).
        rng: random generator (consumed).

    Returns:
        ``len(domains) // 2`` pairs of item indices; one item is left out when the count is odd.
    """
    domains = np.asarray(domains, dtype=np.int64)
    pools = {int(d): list(rng.permutation(np.flatnonzero(domains == d))) for d in np.unique(domains)}
    pairs: list[tuple[int, int]] = []
    remaining = len(domains)
    while remaining >= 2:
        names = [d for d, p in pools.items() if p]
        counts = np.array([len(pools[d]) for d in names], dtype=np.float64)
        if len(names) == 1:  # fallback: only one domain left, pair within it
            first = second = names[0]
        else:
            # a domain holding >= half of what is left must be used now or it ends up unpaired
            tight = [names[i] for i in np.flatnonzero(2 * counts >= remaining)]
            if len(tight) >= 2:
                first, second = tight[0], tight[1]
            else:
                first = tight[0] if tight else names[rng.choice(len(names), p=counts / counts.sum())]
                others = [i for i, d in enumerate(names) if d != first]
                w = counts[others]
                second = names[others[rng.choice(len(others), p=w / w.sum())]]
        a = pools[first].pop()
        b = pools[second].pop()
        pairs.append((int(a), int(b)))
        remaining -= 2
    return pairs


def arrange_pairs(pairs: Sequence[tuple[int, int]]) -> list[int]:
    """Lay pairs out as one batch ``[a_1 .. a_n, b_n .. b_1]`` (pair k at positions k and B-1-k)."""
    first = [int(a) for a, _ in pairs]
    second = [int(b) for _, b in pairs]
    return first + second[::-1]


class PairBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose mirror positions (``i``, ``B-1-i``) are the mixing partners.

    Args:
        domains: domain index of every dataset item.
        batch_size: items per batch on each process (even for ``"cross_domain"``).
        pairing: ``"random"`` (random batches, the authors' choice) or ``"cross_domain"`` (partners
            from different domains whenever possible; see the module docstring for the fallback).
        shuffle: draw a new order every epoch (``False`` keeps the order of ``seed`` and epoch 0).
        seed: base seed; epoch ``e`` uses ``(seed, e)``.
        num_replicas: number of processes; ``None`` reads it from ``torch.distributed`` when it is
            initialised (else 1).
        rank: this process; ``None`` reads it from ``torch.distributed`` (else 0).
    """

    def __init__(
        self,
        domains: Sequence[int],
        batch_size: int,
        pairing: str = "cross_domain",
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (items are mixed in pairs), got {batch_size}")
        if pairing == "cross_domain" and batch_size % 2:
            raise ValueError(f"cross_domain pairing needs an even batch_size, got {batch_size}")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.domains = np.asarray([int(d) for d in domains], dtype=np.int64)
        self.batch_size = int(batch_size)
        self.pairing = pairing
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` (call before iterating)."""
        self.epoch = int(epoch)

    @property
    def epoch_items(self) -> int:
        """Items drawn per epoch over all processes (before dropping the partial batch); 0 without items
        (a config resolved before its latent cache exists)."""
        return max(len(self.domains), self.batch_size * self.num_replicas) if len(self.domains) else 0

    def _global_batches(self) -> list[list[int]]:
        """All batches of this epoch, identical on every process."""
        rng = np.random.default_rng([self.seed, self.epoch if self.shuffle else 0])
        n, need = len(self.domains), self.epoch_items
        if n == 0:
            return []
        # whole permutations until the epoch is full (repeats only when the data are smaller than a batch)
        order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
        bs = self.batch_size
        if self.pairing == "random":
            batches = [order[i : i + bs].tolist() for i in range(0, len(order) - bs + 1, bs)]
        else:
            pairs = cross_domain_pairs(self.domains[order], rng)
            pairs = [(int(order[a]), int(order[b])) for a, b in pairs]
            pairs = [pairs[i] for i in rng.permutation(len(pairs))]
            half = bs // 2
            batches = [arrange_pairs(pairs[i : i + half]) for i in range(0, len(pairs) - half + 1, half)]
        # pad by wrapping around so every process gets the same number of whole batches
        extra = (-len(batches)) % self.num_replicas
        return batches + batches[:extra]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._global_batches()[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        if self.pairing == "random":
            total = self.epoch_items // self.batch_size
        else:
            total = (self.epoch_items // 2) // (self.batch_size // 2)
        return -(-total // self.num_replicas)
