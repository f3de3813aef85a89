"""PairBatchSampler: cross-domain mirror pairing, fallback, epochs, distributed split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from custom_nets.data.samplers import PairBatchSampler, cross_domain_pairs


def _mirror_pairs(batch: list[int]) -> list[tuple[int, int]]:
    b = len(batch)
    return [(batch[i], batch[b - 1 - i]) for i in range(b // 2)]


@pytest.mark.parametrize("counts", [(10, 10, 10), (6, 3, 3), (5, 4, 3, 2), (12, 12)])
def test_cross_domain_partners_differ_when_possible(counts):
    domains = [d for d, c in enumerate(counts) for _ in range(c)]
    sampler = PairBatchSampler(domains, batch_size=4, pairing="cross_domain", seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen))  # each item at most once per epoch
        for b in batches:
            assert len(b) == 4
            for x, y in _mirror_pairs(b):
                assert domains[x] != domains[y], (counts, b)


def test_dominant_domain_falls_back_to_same_domain_pairs_only_as_needed():
    domains = [0] * 14 + [1] * 4 + [2] * 2  # domain 0 holds more than half of the items
    pairs = cross_domain_pairs(domains, np.random.default_rng(0))
    assert len(pairs) == 10
    same = sum(domains[a] == domains[b] for a, b in pairs)
    assert same == (14 - 6) // 2  # the 6 other items each pair with a 0; the 8 zeros left pair up
    assert sorted(i for p in pairs for i in p) == list(range(20))


def test_single_domain_still_yields_full_batches():
    sampler = PairBatchSampler([0] * 9, batch_size=4, pairing="cross_domain")
    batches = list(sampler)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)


def test_epochs_differ_and_repeat_with_the_seed():
    domains = [i % 3 for i in range(30)]
    a = PairBatchSampler(domains, batch_size=6, pairing="cross_domain", seed=1)
    b = PairBatchSampler(domains, batch_size=6, pairing="cross_domain", seed=1)
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0
    assert list(b) == e0


def test_random_pairing_is_random_batches():
    domains = [0] * 50 + [1] * 50
    sampler = PairBatchSampler(domains, batch_size=10, pairing="random", seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10
    assert sorted(i for b in batches for i in b) == list(range(100))
    same = sum(domains[x] == domains[y] for b in batches for x, y in _mirror_pairs(b))
    assert 0 < same < 50  # random pairing does produce same-domain partners


def test_tiny_dataset_is_repeated_to_fill_one_batch():
    sampler = PairBatchSampler([0, 1, 0], batch_size=4, pairing="cross_domain")
    batches = list(sampler)
    assert len(batches) == 1 and len(batches[0]) == 4


@pytest.mark.parametrize("pairing", ["random", "cross_domain"])
def test_distributed_split_gives_whole_disjoint_batches(pairing):
    domains = [i % 4 for i in range(37)]
    world = 3
    per_rank = [list(PairBatchSampler(domains, 4, pairing, seed=5, num_replicas=world, rank=r)) for r in range(world)]
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1  # every process runs the same number of steps
    assert len(per_rank[0]) == len(PairBatchSampler(domains, 4, pairing, seed=5, num_replicas=world, rank=0))
    single = list(PairBatchSampler(domains, 4, pairing, seed=5, num_replicas=1, rank=0))
    together = [b for r in per_rank for b in r]
    # the ranks share out the single-process batch list (plus wrap-around padding)
    assert {tuple(b) for b in together} == {tuple(b) for b in single}
    counts = Counter(tuple(b) for b in together)
    assert sum(counts.values()) - len(counts) == (-len(single)) % world
    if pairing == "cross_domain":
        assert all(domains[x] != domains[y] for b in together for x, y in _mirror_pairs(b))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="pairing"):
        PairBatchSampler([0, 1], 2, pairing="nearest")
    with pytest.raises(ValueError, match="even"):
        PairBatchSampler([0, 1, 2], 3, pairing="cross_domain")
    with pytest.raises(ValueError, match="rank"):
        PairBatchSampler([0, 1], 2, num_replicas=2, rank=2)
