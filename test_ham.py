"""ham.py: the consolidation against a hand computation, its purity, and end-to-end runs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import ham
from conftest import TINY, assert_mechanism_drawn, learned, run_script, write_cifar100_pickles
from lora_vit import PRESETS, ViT, add_lora_

SCALE = 4.0 / 4  # lora_alpha / r in _ham below


def _ham(tasks: int, **kw) -> tuple[ham.HAM, ViT]:
    torch.manual_seed(0)
    model = ViT(PRESETS["vit_nano"], num_classes=100)
    add_lora_(model, ["qkv", "fc1"], rank=4, lora_alpha=4.0)
    kw = dict(density=0.5, max_groups=2, threshold=0.05, importance="learned", grouping="similarity") | kw
    return ham.HAM(model, tasks=tasks, **kw), model


def _train_randomly(method: ham.HAM, task: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Stand in for training: a random adapter and importance; returns each layer's unit-norm-B product B A."""
    method.begin_task(task, batches=None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        method.importance.fill_(alpha)
        for layer in method.layers:
            layer.B.copy_(torch.randn(layer.B.shape, generator=g))
    return [(layer.B / layer.B.norm() @ layer.A).detach().clone() for layer in method.layers]


def _prune(x: torch.Tensor, density: float) -> torch.Tensor:
    return ham.rescale_to_norm(ham.prune_by_magnitude(x, density), x)


def test_consolidation_gives_w0_plus_the_sum_of_group_deltas():
    """Three tasks, two groups: the folded weights equal W0 + sum_g Delta_g computed by hand, with alpha_t
    inside each task's delta, a group's delta the re-pruned sum of its members'."""
    h, _ = _ham(3, threshold=1.0)
    w0 = [w.clone() for w in h.w0]
    alphas, products = [0.5, 2.0, -1.5], []
    for task, alpha in enumerate(alphas):
        products.append(_train_randomly(h, task, alpha, seed=task))
        assert all(layer.delta().abs().sum() > 0 for layer in h.layers)
        h.end_task(task, None, lambda line: None)
    p = [[_prune(a * SCALE * ba, 0.5) for ba in prods] for a, prods in zip(alphas, products)]  # step 2, by hand
    cos = lambda x, y: torch.stack([F.cosine_similarity(u.flatten(), v.flatten(), 0) for u, v in zip(x, y)]).mean()
    # tasks 1 and 2 open groups 1 and 2 (threshold 1 > every cosine); task 3 joins the more similar one
    joined = 0 if cos(p[2], p[0]) > cos(p[2], p[1]) else 1
    for l, layer in enumerate(h.layers):
        group = _prune(p[joined][l] + p[2][l], 0.5)  # the members add, then the group is re-pruned
        torch.testing.assert_close(layer.base.weight, w0[l] + group + p[1 - joined][l], atol=1e-6, rtol=1e-5)
        assert layer.B.abs().sum() == 0 and layer.importance is None and not layer.unit_b
    assert h.summary()["groups"] == ([[1, 3], [2]] if joined == 0 else [[1], [2, 3]])


def test_a_fresh_adapter_changes_nothing_and_alpha_is_its_scale():
    h, model = _ham(2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    params = h.begin_task(0, None)
    assert params[0]["params"] == [h.importance] and h.importance.item() == 0
    # alpha_t's step stands for |B|_F's: Adam moves each of B's d*r entries by about lr, so sqrt(d*r) times lr
    assert params[0]["lr_scale"] == math.sqrt(h.layers[0].B.numel())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # alpha_0 = 0
        h.importance.fill_(2.0)
        for layer in h.layers:
            layer.B.mul_(7.0)  # B's scale does not matter: it is used at unit norm
            torch.testing.assert_close(layer.delta().norm(), 2.0 * SCALE * (layer.B / layer.B.norm() @ layer.A).norm())
            # the copyable importance step is what the layer computes, to the bit, and what the forward pass adds
            assert torch.equal(ham.importance_delta(h.importance, layer.A, layer.B, layer.scale), layer.delta())
        x_in = torch.randn(5, h.layers[0].A.shape[1])
        layer = h.layers[0]
        torch.testing.assert_close(layer(x_in) - layer.base(x_in),
                                   x_in @ ham.importance_delta(h.importance, layer.A, layer.B, layer.scale).T)


def test_joining_a_group_keeps_the_task_within_the_pruning_error():
    """The folded model's outputs on the task's own inputs after it joins a group stay within the error that
    pruning alone causes (the old mean merge shrank the task by 1/(n+1) and failed this)."""
    h, model = _ham(2, max_groups=1, adapter_init="fresh")  # two random adapters: nearly orthogonal deltas
    _train_randomly(h, 0, 1.0, seed=0)
    h.end_task(0, None, lambda line: None)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _train_randomly(h, 1, 1.0, seed=1)
    with torch.no_grad():
        unmerged = model.forward_features(x)  # W0 + group 1 + the task's unpruned adapter
        pruned_alone = [_prune(layer.delta(), 0.5) for layer in h.layers]
        for layer, p in zip(h.layers, pruned_alone):  # the pruning error alone: the task's delta pruned, added
            layer.base.weight.add_(p)
            layer.importance.data.zero_()
        pruning_error = (model.forward_features(x) - unmerged).norm()
        for layer, p in zip(h.layers, pruned_alone):
            layer.base.weight.sub_(p)
            layer.importance.data.fill_(1.0)
    h.end_task(1, None, lambda line: None)
    with torch.no_grad():
        merged_error = (model.forward_features(x) - unmerged).norm()
    assert h.summary()["groups"] == [[1, 2]] and pruning_error > 0
    assert merged_error < 1.5 * pruning_error


def test_grouping_changes_the_weights_through_the_group_step():
    g = torch.Generator().manual_seed(0)
    tasks = [[torch.randn(6, 5, generator=g)] for _ in range(3)]

    def weights(choices: list[int], density: float) -> torch.Tensor:
        groups = []
        for t, choice in enumerate(choices):
            groups, *_ = ham.consolidate(tasks[t], groups, task=t, density=density, max_groups=2, threshold=0.0,
                                         tasks_left=3 - t, choice=choice)
        return ham.merged_delta(groups)[0]

    assert not torch.allclose(weights([0, 0, 1], 0.3), weights([0, 1, 1], 0.3))  # non-linear: grouping matters
    torch.testing.assert_close(weights([0, 0, 1], 1.0), weights([0, 1, 1], 1.0))  # without pruning it cannot


def test_a_parallel_delta_joins_and_an_orthogonal_one_opens_a_group():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(8, 8, generator=g)
    groups, *_ = ham.consolidate([d], [], task=0, density=1.0, max_groups=3, threshold=0.05, tasks_left=3)
    orthogonal = torch.randn(8, 8, generator=g)
    orthogonal -= (orthogonal * d).sum() / (d * d).sum() * d
    joined, g1, sims, why = ham.consolidate([2 * d], groups, task=1, density=1.0, max_groups=3, threshold=0.05,
                                            tasks_left=5)  # more tasks to come than free groups
    assert g1 == 0 and sims[0] == pytest.approx(1.0) and ">= threshold" in why
    opened, g2, sims, why = ham.consolidate([orthogonal], groups, task=1, density=1.0, max_groups=3, threshold=0.05,
                                            tasks_left=5)
    assert g2 == 1 and abs(sims[0]) < 1e-5 and "< threshold" in why


def test_consolidate_does_not_modify_its_inputs():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 4, generator=g), torch.randn(3, 5, generator=g)]
    group = ham.Group((0,), tuple(torch.randn(d.shape, generator=g) for d in deltas))
    before = [d.clone() for d in deltas], [t.clone() for t in group.delta]
    groups, index, sims, _ = ham.consolidate(deltas, [group], task=1, density=0.3, max_groups=1, threshold=0.3,
                                             tasks_left=1)
    assert all(torch.equal(a, b) for a, b in zip(deltas, before[0]))
    assert all(torch.equal(a, b) for a, b in zip(group.delta, before[1])) and group.members == (0,)
    assert index == 0 and groups[0].members == (0, 1) and len(sims) == 1


def test_stored_state_round_trips():
    h, _ = _ham(4, density=0.2)
    for task in range(3):
        _train_randomly(h, task, 1.0 + task, seed=task)
        h.end_task(task, None, lambda line: None)
    fresh, _ = _ham(4, density=0.2)
    fresh.load_state_dict(h.state_dict())
    assert [g.members for g in fresh.groups] == [g.members for g in h.groups]
    for a, b in zip(ham.merged_delta(fresh.groups), ham.merged_delta(h.groups)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("argv,message", [
    (["--density", "0"], "--density must be in (0, 1]"),
    (["--density", "1.5"], "--density must be in (0, 1]"),
    (["--groups", "0"], "--groups must be at least 1"),
    (["--threshold", "2"], "--threshold is a cosine"),
    (["--importance", "max"], "invalid choice"),
    (["--grouping", "max"], "invalid choice"),
])
def test_bad_flags(argv, message, usage_error):
    assert message in usage_error(ham.Args, argv)


E2E = [*TINY, "--tasks", "5", "--epochs", "3", "--train-per-class", "24"]


def test_end_to_end_on_cifar_format_files(tmp_path):
    write_cifar100_pickles(tmp_path / "data", train_per_class=24, test_per_class=4)
    argv = [a for a in E2E if a not in ("--dataset", "synthetic")]
    stdout = run_script("ham", [*argv, "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run")]).stdout
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["finished"] and not r["synthetic_data"] and r["class_order"][:3] == [68, 56, 78]
    assert len(r["accuracy_matrix"]) == 5 and r["accuracy_matrix"][0][1] is None and learned(r)
    assert len(r["groups"]) <= 5 and sorted(sum(r["groups"], [])) == [1, 2, 3, 4, 5]
    assert "synthetic" not in stdout


def test_end_to_end_synthetic(tmp_path):
    stdout = run_script("ham", [*E2E, "--groups", "2", "--out", str(tmp_path)]).stdout
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["finished"] and r["synthetic_data"] and learned(r)
    assert len(r["groups"]) == 2 and sorted(sum(r["groups"], [])) == [1, 2, 3, 4, 5]
    assert all(line.startswith("[synthetic data]") for line in stdout.splitlines())
    assert r["trainable_params"] > 0 and r["stored_params"] > 0 and [t["group"] for t in r["tasks"]][:2] == [1, 2]
    assert "(the first task opens a group)" in stdout and "groups taken; the most similar has cosine" in stdout
    assert_mechanism_drawn(tmp_path, stdout)


def test_groups_equal_to_tasks_is_no_merging(tmp_path):
    r = ham.main([*TINY, "--tasks", "5", "--epochs", "1", "--train-per-class", "4", "--groups", "5",
                  "--out", str(tmp_path)])
    assert r["groups"] == [[1], [2], [3], [4], [5]]


@pytest.mark.parametrize("importance", ["learned", "fixed"])
def test_shared_init_starts_every_task_from_the_same_adapter(importance):
    """Shared: each task's adapter starts at the A the seed drew and at a B far below one Adam step, whatever the
    last task trained; fresh: A is redrawn, so two tasks' deltas would not share coordinates."""
    for adapter_init in ("shared", "fresh"):
        h, _ = _ham(3, importance=importance, adapter_init=adapter_init)
        starts = []
        for task in range(2):
            h.begin_task(task, None)
            starts.append([(layer.A.detach().clone(), layer.B.detach().clone()) for layer in h.layers])
            with torch.no_grad():
                for layer in h.layers:  # stand in for training
                    layer.A.add_(1.0), layer.B.add_(1.0)
                if h.importance is not None:
                    h.importance.fill_(0.5)
            h.end_task(task, None, lambda line: None)
        for (a0, b0), (a1, b1) in zip(*starts):
            assert torch.equal(a0, a1) == (adapter_init == "shared")
            if importance == "fixed":
                assert b0.abs().sum() == 0 and b1.abs().sum() == 0  # a plain LoRA's B starts at 0
            elif adapter_init == "shared":
                assert torch.equal(b0, b1) and 0 < b0.abs().max() <= 10 * ham.B_INIT_STD
            else:
                assert not torch.equal(b0, b1) and b0.abs().max() > 0.1
