"""Hypothesis property tests of HAM's merge math and of folding a LoRA layer."""
import math

import torch
from hypothesis import given, strategies as st

import ham
import lora_vit

seeds = st.integers(0, 2**31 - 1)
dims = st.integers(1, 12)
densities = st.floats(0.01, 1.0)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- prune and scale


@given(seeds, dims, dims, densities)
def test_prune_keeps_the_largest_ceil_rho_n(seed, d, k, rho):
    x = randn(seed, d, k)  # continuous values: no ties, no zeros
    p = ham.prune_by_magnitude(x, rho)
    kept = p != 0
    assert kept.sum().item() == math.ceil(rho * x.numel())
    assert torch.equal(p[kept], x[kept])  # kept entries are untouched
    if (~kept).any():
        assert x[kept].abs().min() >= x[~kept].abs().max()


@given(seeds, dims, dims)
def test_prune_at_density_one_is_identity(seed, d, k):
    x = randn(seed, d, k)
    assert torch.equal(ham.prune_by_magnitude(x, 1.0), x)


@given(seeds, dims, dims, densities)
def test_rescale_restores_the_unpruned_norm(seed, d, k, rho):
    x = randn(seed, d, k)
    s = ham.rescale_to_norm(ham.prune_by_magnitude(x, rho), x)
    assert math.isclose(s.norm().item(), x.norm().item(), rel_tol=1e-9)
    assert torch.equal(s != 0, ham.prune_by_magnitude(x, rho) != 0)  # scaling keeps the support


# ---- the group step


@given(seeds, dims, dims, densities)
def test_group_step_keeps_the_budget_and_the_sums_norm(seed, d, k, rho):
    g, p = randn(seed, d, k), randn(seed + 1, d, k)
    (merged,) = ham.merge_into_group([g], [p], rho)
    assert (merged != 0).sum().item() <= math.ceil(rho * d * k)  # a group stores no more than one task
    assert math.isclose(merged.norm().item(), (g + p).norm().item(), rel_tol=1e-9)


@given(seeds, st.lists(st.floats(-3, 3), min_size=1, max_size=6))
def test_without_pruning_a_group_is_the_sum_of_its_members(seed, scales):
    layers = [[s * randn(seed + i, 4, 3) for i, s in enumerate(scales)], [s * randn(seed + 50 + i, 2, 5) for i, s in enumerate(scales)]]
    groups = []
    for i in range(len(scales)):  # one group: every task joins it
        groups, g, _, _ = ham.consolidate([layer[i] for layer in layers], groups, task=i, density=1.0, max_groups=1,
                                          threshold=0.3, tasks_left=len(scales) - i)
        assert g == 0
    for got, layer in zip(groups[0].delta, layers):
        torch.testing.assert_close(got, sum(layer).float())
    assert groups[0].members == tuple(range(len(scales)))


@given(seeds, dims, dims, densities)
def test_a_pruned_delta_is_a_fixed_point_of_the_group_step(seed, d, k, rho):
    p = ham.rescale_to_norm(ham.prune_by_magnitude(randn(seed, d, k), rho), randn(seed, d, k))
    (merged,) = ham.merge_into_group([torch.zeros_like(p)], [p], rho)
    torch.testing.assert_close(merged, p)


# ---- grouping


@given(st.lists(st.lists(st.floats(-1, 1), max_size=8), min_size=1, max_size=20), st.integers(1, 8),
       st.floats(-1, 1))
def test_grouping_never_exceeds_max_groups(similarity_rows, max_groups, threshold):
    n = 0
    T = len(similarity_rows)
    for t, row in enumerate(similarity_rows):
        sims = (row + [0.0] * n)[:n]  # one similarity per existing group
        g, _ = ham.choose_group(sims, max_groups=max_groups, threshold=threshold, tasks_left=T - t)
        assert 0 <= g <= n
        n += g == n
        assert n <= max_groups


@given(st.integers(1, 20), st.floats(-1, 1))
def test_max_groups_equal_tasks_never_merges(T, threshold):
    groups = 0
    for t in range(T):
        g, _ = ham.choose_group([1.0] * groups, max_groups=T, threshold=threshold, tasks_left=T - t)
        assert g == groups  # always a new group, even when identical to an existing one
        groups += 1


@given(seeds, st.integers(2, 5), st.floats(-1, 0.99))
def test_identical_delta_joins_its_group(seed, n_groups, threshold):
    group_deltas = [[randn(seed + 7 * g, 6, 4), randn(seed + 7 * g + 1, 3, 3)] for g in range(n_groups)]
    target = (seed % n_groups)
    sims = [ham.mean_cosine(group_deltas[target], gd) for gd in group_deltas]
    assert math.isclose(sims[target], 1.0, rel_tol=1e-6)
    # free groups remain, but fewer than the tasks to come, so the threshold rule decides
    g, _ = ham.choose_group(sims, max_groups=n_groups + 3, threshold=threshold, tasks_left=100)
    assert g == target


# ---- LoRA


@given(seeds, st.integers(1, 4), st.floats(0.1, 16))
def test_folding_a_lora_layer_keeps_its_outputs(seed, r, lora_alpha):
    torch.manual_seed(seed)
    layer = lora_vit.LoRALinear(torch.nn.Linear(6, 5).double(), rank=r, lora_alpha=lora_alpha).double()
    torch.nn.init.normal_(layer.B)  # non-zero B
    x = randn(seed, 3, 6)
    with torch.no_grad():
        before = layer(x)
        layer.fold_()
        torch.testing.assert_close(layer(x), before)
        torch.testing.assert_close(layer.base(x), before)
