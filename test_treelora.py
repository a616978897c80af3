"""treelora.py: the K-D tree, the bandit search against an exhaustive one, the regulariser, sparse updates."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import treelora
from treelora import LCBTreeSearch, build_kdtree, exhaustive_min_lcb

HERE = Path(__file__).parent
seeds = st.integers(0, 2**31 - 1)


def random_vectors(seed: int, tasks: int, layers: int, dim: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tasks, dim, generator=g) for _ in range(layers)]


# ---- the tree


@given(seeds, st.integers(1, 40), st.integers(1, 6))
def test_tree_partitions_tasks_into_balanced_leaves(seed, T, L):
    tree = build_kdtree(random_vectors(seed, T, L))
    leaves = [n for n in range(len(tree.left)) if tree.left[n] < 0]
    in_leaves = sorted(t for n in leaves for t in tree.node_tasks[n])
    assert in_leaves == list(range(T))  # every task in exactly one leaf
    for n in range(len(tree.left)):
        lo, hi = tree.left[n].item(), tree.right[n].item()
        if lo >= 0:
            a, b = tree.node_tasks[lo], tree.node_tasks[hi]
            assert abs(len(a) - len(b)) <= 1 and sorted(a + b) == sorted(tree.node_tasks[n])
            assert tree.parent[lo] == n and tree.parent[hi] == n
    assert tree.height <= L
    for t in range(T):
        assert t in tree.node_tasks[tree.leaf_of_task[t]]


@given(seeds, st.integers(2, 30))
def test_split_sends_higher_scores_left(seed, T):
    vectors = random_vectors(seed, T, 1)
    tree = build_kdtree(vectors)
    v = vectors[0].double()
    score = v @ v.mean(0)
    lo, hi = tree.node_tasks[tree.left[0]], tree.node_tasks[tree.right[0]]
    assert score[lo].min() >= score[hi].max()


def test_tree_stops_at_one_level_per_layer():
    tree = build_kdtree(random_vectors(0, 20, 2))
    assert tree.height == 2
    assert max(len(tree.node_tasks[n]) for n in range(len(tree.left)) if tree.left[n] < 0) == 5


# ---- the search


def play_all(search: LCBTreeSearch, rewards: torch.Tensor, rounds: int) -> None:
    """Play every arm of every layer `rounds` times with the given (T, L) rewards, bypassing select()."""
    T, L = rewards.shape
    for _ in range(rounds):
        for t in range(T):
            search.update_(torch.full((L,), t), rewards[t])


@settings(max_examples=40)  # each example plays up to a few hundred bandit rounds
@given(seeds, st.integers(1, 20), st.integers(1, 4), st.integers(1, 2), st.floats(0.01, 2.0))
def test_search_equals_exhaustive_with_equal_play_counts(seed, T, L, rounds, c):
    g = torch.Generator().manual_seed(seed)
    search = LCBTreeSearch(build_kdtree(random_vectors(seed, T, L)), L, c=c, device=torch.device("cpu"))
    play_all(search, torch.rand(T, L, generator=g), rounds)
    search.step = T * rounds
    got = search.select()
    assert torch.equal(got, exhaustive_min_lcb(search.total, search.plays, step=search.step, c=c))


@settings(max_examples=40)  # each example plays up to a few hundred bandit rounds
@given(seeds, st.integers(1, 30), st.integers(1, 4), st.lists(st.integers(0, 10**6), max_size=40))
def test_search_equals_exhaustive_without_exploration(seed, T, L, extra):
    """c = 0: the bound is each subtree's smallest mean, exact for any play counts."""
    g = torch.Generator().manual_seed(seed)
    search = LCBTreeSearch(build_kdtree(random_vectors(seed, T, L)), L, c=0.0, device=torch.device("cpu"))
    play_all(search, torch.rand(T, L, generator=g), 1)
    for e in extra:  # uneven extra plays with fresh rewards
        search.update_(torch.tensor([(e + l) % T for l in range(L)]), torch.rand(L, generator=g))
    got = search.select()
    assert torch.equal(got, exhaustive_min_lcb(search.total, search.plays, step=search.step, c=0.0))


@settings(max_examples=40)  # each example plays up to a few hundred bandit rounds
@given(seeds, st.integers(1, 25), st.integers(1, 3))
def test_search_plays_every_unplayed_arm_first(seed, T, L):
    g = torch.Generator().manual_seed(seed)
    search = LCBTreeSearch(build_kdtree(random_vectors(seed, T, L)), L, c=0.5, device=torch.device("cpu"))
    chosen = []
    for _ in range(T):
        k = search.select()
        chosen.append(k)
        search.update_(k, torch.rand(L, generator=g))
    chosen = torch.stack(chosen)  # (T, L)
    for layer in range(L):
        assert sorted(chosen[:, layer].tolist()) == list(range(T))


def test_search_converges_to_the_nearest_task():
    T, L, best = 12, 2, torch.tensor([7, 3])
    g = torch.Generator().manual_seed(0)
    means = torch.rand(T, L, generator=g) * 0.5 + 0.5
    means[best, torch.arange(L)] = 0.2  # a clear gap
    search = LCBTreeSearch(build_kdtree(random_vectors(1, T, L)), L, c=0.3, device=torch.device("cpu"))
    picks = []
    for _ in range(300):
        k = search.select()
        search.update_(k, means[k, torch.arange(L)] + 0.1 * torch.randn(L, generator=g))
        picks.append(k)
    late = torch.stack(picks[-100:])
    for layer in range(L):
        assert (late[:, layer] == best[layer]).float().mean() > 0.8


def test_reset_forgets_statistics():
    search = LCBTreeSearch(build_kdtree(random_vectors(0, 5, 2)), 2, c=0.1, device=torch.device("cpu"))
    play_all(search, torch.rand(5, 2), 2)
    search.reset_()
    assert search.plays.sum() == 0 and search.step == 0
    assert torch.isinf(search.node_mean).all() and (search.node_plays == 0).all()


# ---- regulariser and sparse gradients


def test_l1_pull_is_zero_at_target_and_its_gradient_points_toward_it():
    g = torch.Generator().manual_seed(0)
    target = [torch.randn(4, 6, generator=g), torch.randn(3, 5, generator=g)]
    assert treelora.l1_pull(target, target).abs().sum() == 0
    A = [(t + torch.randn(t.shape, generator=g)).requires_grad_() for t in target]
    treelora.l1_pull(A, target).sum().backward()
    for a, t in zip(A, target):
        stepped = a.detach() - 0.01 * a.grad
        assert (stepped - t).abs().sum() < (a.detach() - t).abs().sum()
        assert torch.equal(a.grad, torch.sign(a.detach() - t) / t.numel())


@given(seeds, st.floats(0.05, 1.0))
def test_sparsifier_keeps_the_largest_fraction(seed, density):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.zeros(7, 9))
    full = torch.randn(7, 9, generator=g)
    p.grad = full.clone()
    treelora.sparsify_gradients_([p], density)
    kept = p.grad != 0
    assert kept.sum() == math.ceil(density * full.numel())
    assert torch.equal(p.grad[kept], full[kept])
    if (~kept).any():
        assert full[kept].abs().min() >= full[~kept].abs().max()


# ---- command line and a tiny run


@pytest.mark.parametrize("argv,message", [
    (["--lam", "-1"], "--lam must be a non-negative number"),
    (["--lcb-c", "-0.5"], "--lcb-c must be a non-negative number"),
    (["--grad-density", "0"], "--grad-density must be in (0, 1]"),
    (["--tasks", "3"], "--tasks must divide 100"),
])
def test_bad_flags(argv, message, usage_error):
    assert message in usage_error(treelora.Args, argv)


def test_end_to_end_synthetic(tmp_path):
    argv = ["--dataset", "synthetic", "--backbone", "vit_nano", "--tasks", "4", "--epochs", "2",
            "--batch-size", "32", "--train-per-class", "24", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "treelora.py", *argv], cwd=HERE, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["finished"] and r["synthetic_data"] and r["method"] == "treelora"
    assert r["metrics"]["A_last"] > 2 * 1.0  # chance is 1%
    sel = r["tasks"][3]["selections"]  # task 4 chose among 3 past tasks, for each of the 2 LoRA layers
    assert len(sel) == 2 and all(len(row) == 3 for row in sel) and sum(sel[0]) > 0
    assert sorted(sum(r["tree"][:1], [])) == [0, 1, 2, 3]
