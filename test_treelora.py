"""treelora.py: the K-D tree, the bandit search against an exhaustive one, the regulariser, sparse updates."""
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import continual
from data import class_order, make_synthetic, split_data
import treelora
from conftest import TINY, assert_mechanism_drawn, learned, run_script
from lora_vit import PRESETS, ViT, add_lora_, lora_parameters
from treelora import LCBTreeSearch, build_kdtree, exhaustive_min_lcb

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


@settings(max_examples=40)
@given(seeds, st.integers(1, 25), st.integers(1, 3), st.floats(0.0, 1.0))
def test_warm_start_equals_one_play_of_every_arm(seed, T, L, c):
    """warm_start_ leaves the statistics that playing each arm once does, so the next pick is the exhaustive
    minimum-LCB arm (equal play counts make the descent exact), not an unplayed arm in turn."""
    rewards = torch.rand(T, L, generator=torch.Generator().manual_seed(seed))
    tree = build_kdtree(random_vectors(seed, T, L))
    warm = LCBTreeSearch(tree, L, c=c, device=torch.device("cpu"))
    warm.warm_start_(rewards)
    played = LCBTreeSearch(tree, L, c=c, device=torch.device("cpu"))
    play_all(played, rewards, 1)
    for name in ("total", "plays", "node_mean", "node_plays"):
        torch.testing.assert_close(getattr(warm, name), getattr(played, name), atol=0, rtol=0)
    assert torch.equal(warm.select(), exhaustive_min_lcb(rewards, torch.ones(T, L), step=T + 1, c=c))


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


def test_the_root_split_separates_two_clusters_of_drifts():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(16, generator=g)
    far = [centre + 0.05 * torch.randn(16, generator=g) for _ in range(4)]  # 4 tasks that drifted alike
    near = [0.05 * torch.randn(16, generator=g) for _ in range(4)]  # 4 that barely moved
    order = [0, 5, 1, 6, 2, 7, 3, 4]  # interleaved task ids
    vectors = torch.stack([(far + near)[i] for i in order])
    tree = build_kdtree([vectors, vectors])
    sides = [sorted(tree.node_tasks[tree.left[0]]), sorted(tree.node_tasks[tree.right[0]])]
    far_ids = sorted(t for t, i in enumerate(order) if i < 4)
    assert far_ids in sides and sorted(set(range(8)) - set(far_ids)) in sides


# ---- the method inside the loop


def _setup(tasks: int = 4, *, lam: float = 0.5, grad_density: float = 1.0, arm: str = "tree", **kw):
    torch.manual_seed(0)
    model = ViT(PRESETS["vit_nano"], num_classes=100)
    add_lora_(model, ["qkv"], rank=4, lora_alpha=4.0)
    method = treelora.TreeLoRA(model, lam=lam, lcb_c=0.01, grad_density=grad_density, arm=arm, **kw)
    data = split_data(make_synthetic(0, 8, 2), order=class_order(1993), tasks=tasks,
                                train_per_class=8, device=torch.device("cpu"))
    gen, device_gen = continual.run_generators(0, torch.device("cpu"))
    batches = lambda t: continual.TaskBatches(data, t, batch_size=16, img_size=32, normalize="imagenet", gen=gen,
                                              device_gen=device_gen)
    return model, method, batches


def _train(model, method, batches, task: int, epochs: int = 1) -> None:
    clock = {"start": 0.0, "epochs_done": 0, "epochs_total": epochs}
    continual.train_task(model, method, batches, epochs=epochs, lr=5e-3, head_lr=5e-3, task=task, tasks=4, clock=clock,
                         log=lambda line: None)
    method.end_task(task, batches, lambda line: None)


def test_stored_vector_is_the_last_epochs_mean_of_a():
    model, method, batches = _setup()
    seen, real = [], method.penalty

    def recording(task_loss):
        seen.append([layer.A.detach().clone() for layer in method.layers])
        return real(task_loss)

    method.penalty = recording
    b = batches(0)
    _train(model, method, b, 0, epochs=2)
    last = seen[len(b):]  # the second epoch's steps
    assert len(last) == len(b)
    for l, g in enumerate(method.g):
        torch.testing.assert_close(g[0], torch.stack([s[l] for s in last]).mean(0))
        assert not torch.allclose(g[0], torch.stack([s[l] for s in seen[: len(b)]]).mean(0))  # not epoch 1's


def test_the_pull_is_worth_lam_s_times_the_task_loss_and_targets_the_selected_task():
    model, method, batches = _setup(lam=0.5)
    for task in range(2):
        _train(model, method, batches(task), task)
    b = batches(2)
    method.begin_task(2, b)
    n = len(b)
    for epoch in range(2):
        for step in range(1, n + 1):
            before = method.chosen.clone()
            task_loss = torch.tensor(1.7)
            value = method.penalty(task_loss)
            k = (method.chosen - before).argmax(0)  # the past task chosen for each layer at this step
            ramp = 0.5 * step / n  # lam_s ramps from 0 to lam within the epoch
            A = [layer.A for layer in method.layers]
            targets = [method.g[l][k[l]] for l in range(len(A))]
            pull = treelora.l1_pull(A, targets).sum().item()
            torch.testing.assert_close(value.item(), ramp * 1.7 * pull / (pull + 1e-5))  # exactly
            assert value.item() == pytest.approx(ramp * 1.7, rel=0.01)  # lam_s L_task, whatever the pull's scale
            grads = torch.autograd.grad(value, A)
            for a, t, g in zip(A, targets, grads):  # the gradient is the L1 pull's, scaled to lam_s * L / pull
                torch.testing.assert_close(g, ramp * 1.7 / (pull + 1e-5) * torch.sign(a.detach() - t) / t.numel())
                stepped = a.detach() - 1e-3 * g
                assert (stepped - t).abs().sum() < (a.detach() - t).abs().sum()  # a step moves A toward g_k
        method.end_epoch(epoch)


@pytest.mark.parametrize("reward", ["position", "drift"])
def test_bandit_rewards_are_distances_from_the_running_mean_of_a(reward):
    """position: the epoch's running mean of A against g_k; drift: that mean minus g_{t-1} against g_k - g_{k-1}."""
    model, method, batches = _setup(lam=0.5, reward=reward, search_start="cold")  # unscaled rewards
    for task in range(2):
        _train(model, method, batches(task), task)
    method.begin_task(2, batches(2))
    seen = []
    for _ in range(3):
        with torch.no_grad():
            for layer in method.layers:
                layer.A.add_(0.1 * torch.randn_like(layer.A))  # A moves between steps
        seen.append([layer.A.detach().clone() for layer in method.layers])
        total_before = method.search.total.clone()
        before = method.chosen.clone()
        method.penalty(torch.tensor(1.0))
        k = (method.chosen - before).argmax(0)
    running = [torch.stack([s[l] for s in seen]).mean(0) for l in range(len(method.layers))]
    played = method.search.total - total_before  # the last play's reward per layer
    for l in range(len(method.layers)):
        if reward == "position":
            here, there = running[l], method.g[l][k[l]]
            live = (seen[-1][l] - there).abs().mean()
        else:
            here, there = running[l] - method.g[l][1], method.g[l][k[l]] - (method.g[l][k[l] - 1] if k[l] else 0)
            live = (seen[-1][l] - method.g[l][1] - there).abs().mean()
            if k[l] == 0:  # the first task's drift is from the initial A, kept only as the drift itself
                there = method.drifts[l][0].view_as(here)
        torch.testing.assert_close(played[k[l], l], (here - there).abs().mean())
        assert not torch.isclose(played[k[l], l], live)  # not the live A's distance


@pytest.mark.parametrize("reward", ["position", "drift"])
def test_warm_search_plays_every_past_task_at_the_epochs_first_step(reward):
    """Warm: at an epoch's first step every arm gets one play scored from the current A at once, so the first
    pick is already the nearest past task (equal play counts), where a cold bandit would play task 1 first."""
    model, method, batches = _setup(5, lam=0.5, search_start="warm", reward=reward)
    for task in range(4):
        _train(model, method, batches(task), task)
    method.begin_task(4, batches(4))
    A = [layer.A.detach().clone() for layer in method.layers]
    method.penalty(torch.tensor(1.0))
    if reward == "position":
        dist = torch.stack([(g - a).flatten(1).abs().mean(1) for g, a in zip(method.g, A)], 1)
    else:
        dist = torch.stack([(d - (a - g[-1]).flatten()).abs().mean(1) for d, g, a in zip(method.drifts, method.g, A)], 1)
    assert (method.search.plays.sum(0) == 4 + 1).all()  # 4 warm plays and the step's own, per layer
    assert torch.equal(method.chosen.argmax(0), dist.argmin(0))
    # rewards in units of the first play's mean distance per layer: the warm plays average 1
    torch.testing.assert_close(method.reward_scale, dist.mean(0))
    k = method.chosen.argmax(0)
    warm_total = dist / dist.mean(0)
    warm_total[k, torch.arange(len(k))] *= 2  # the step's own play of the chosen arm, the same distance again
    torch.testing.assert_close(method.search.total, warm_total)


def test_random_arm_is_uniform_and_previous_and_first_arms_are_fixed():
    model, method, batches = _setup(5, lam=0.5, arm="random")
    for task in range(4):
        _train(model, method, batches(task), task)
    method.begin_task(4, batches(4))
    torch.manual_seed(123)
    for _ in range(2000):
        method.penalty(torch.tensor(1.0))
    counts = method.chosen.sum(1)  # over both layers: 4000 picks among 4 past tasks
    assert counts.sum() == 4000 and ((counts - 1000).abs() < 100).all()  # each within 10% of uniform
    model, method, batches = _setup(lam=0.5, arm="previous")
    for task in range(3):
        _train(model, method, batches(task), task)
    method.begin_task(3, batches(3))
    for _ in range(5):
        method.penalty(torch.tensor(1.0))
    assert method.chosen[:2].sum() == 0 and method.chosen[2].sum() == 5 * len(method.layers)
    model, method, batches = _setup(lam=0.5, arm="first")
    for task in range(3):
        _train(model, method, batches(task), task)
    method.begin_task(3, batches(3))
    A = [layer.A.detach().clone() for layer in method.layers]
    reg = method.penalty(torch.tensor(1.0))
    assert method.chosen[1:].sum() == 0 and method.chosen[0].sum() == len(method.layers)
    pull = torch.stack([(a - g[0]).abs().mean() for a, g in zip(A, method.g)]).sum()  # toward task 1's g
    torch.testing.assert_close(reg, treelora.scale_free(pull, torch.tensor(1.0), 0.5 / method.steps_per_epoch))


def test_lambda_zero_keeps_nothing():
    model, method, batches = _setup(lam=0.0)
    for task in range(2):
        _train(model, method, batches(task), task)
    assert method.stored_tensors() == [] and method.penalty(torch.tensor(1.0)) is None


def test_sparse_gradients_reach_the_optimiser(monkeypatch):
    model, method, batches = _setup(lam=0.0, grad_density=0.25)
    lora = lora_parameters(method.layers)
    counts, real_step = [], torch.optim.Adam.step

    def inspecting_step(self, *a, **k):
        counts.append([(p.grad != 0).sum().item() for p in lora if p.grad is not None])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", inspecting_step)
    _train(model, method, batches(0), 0)
    _train(model, method, batches(1), 1)
    limits = [math.ceil(0.25 * p.numel()) for p in lora]
    assert all(len(c) == len(lora) and all(n <= m for n, m in zip(c, limits)) for c in counts)
    assert [max(c[i] for c in counts) for i in range(len(lora))] == limits  # the budget is reached, not exceeded


# ---- command line and a tiny run


@pytest.mark.parametrize("argv,message", [
    (["--lam", "-1"], "--lam must be a non-negative number"),
    (["--lcb-c", "-0.5"], "--lcb-c must be a non-negative number"),
    (["--grad-density", "0"], "--grad-density must be in (0, 1]"),
    (["--arm", "best"], "invalid choice"),
    (["--tasks", "3"], "--tasks must divide the 100 classes"),
])
def test_bad_flags(argv, message, usage_error):
    assert message in usage_error(treelora.Args, argv)


def test_end_to_end_synthetic(tmp_path):
    stdout = run_script("treelora", [*TINY, "--tasks", "4", "--epochs", "3", "--train-per-class", "24",
                                     "--out", str(tmp_path)]).stdout
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["finished"] and r["synthetic_data"] and r["method"] == "treelora" and learned(r)
    sel = r["tasks"][3]["selections"]  # task 4 chose among 3 past tasks, for each of the 2 LoRA layers
    assert len(sel) == 2 and all(len(row) == 3 for row in sel)
    assert sum(sel[0]) == sum(sel[1]) == 3 * math.ceil(24 * 25 / 32)  # one choice per layer and step
    assert sorted(r["tree"][0]) == [1, 2, 3, 4]  # tasks counted from 1
    assert "|grad reg| / |grad CE|" in stdout and "TreeLoRA (tree): picks of past tasks 1..3" in stdout
    ratios = r["tasks"][3]["grad_ratio_per_epoch"]  # one per epoch, as the epoch lines print them
    assert len(ratios) == 3 and all(f"|grad reg| / |grad CE| {v:.3f}" in stdout for v in ratios)
    assert_mechanism_drawn(tmp_path, stdout)


def test_nearest_past_task_is_the_exhaustive_l1_argmin():
    # layer 0: the last row [1, 1] is nearest (mean L1) to row 1 [1, 2] (0.5), not row 0 [3, 3] (2) or row 2 [0, 4]
    # (2); layer 1: nearest to row 0
    layer0 = torch.tensor([[3.0, 3.0], [1.0, 2.0], [0.0, 4.0], [1.0, 1.0]])
    layer1 = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-4.0, 4.0], [0.5, -0.5]])
    assert treelora.nearest_past([layer0, layer1]) == [1, 0]
