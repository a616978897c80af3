"""ham.py: the consolidation against a hand computation, its purity, and end-to-end runs."""
import json

import pytest
import torch
import torch.nn.functional as F

import ham
from conftest import TINY, learned, run_script, write_cifar100_pickles
from lora_vit import PRESETS, ViT, add_lora_

SCALE = 4.0 / 4  # lora_alpha / r in _ham below


def _ham(tasks: int, **kw) -> tuple[ham.HAM, ViT]:
    torch.manual_seed(0)
    model = ViT(PRESETS["vit_nano"], num_classes=100)
    add_lora_(model, ["qkv", "fc1"], rank=4, lora_alpha=4.0)
    return ham.HAM(model, tasks=tasks, **kw), model


def _train_randomly(method: ham.HAM, task: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Stand in for training: a random adapter and importance; returns the task's B A per layer (no scale)."""
    method.begin_task(task, batches=None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        method.importance.fill_(alpha)
        for layer in method.layers:
            layer.B.copy_(torch.randn(layer.B.shape, generator=g))
    return [(layer.B @ layer.A).detach().clone() for layer in method.layers]


def test_consolidation_gives_w0_plus_the_sum_of_group_deltas():
    """Three tasks, two groups, pruning on: the folded weights equal W0 + sum_g Delta_g computed by hand."""
    h, _ = _ham(3, density=0.5, max_groups=2, threshold=1.0, merge="mean")
    w0 = [w.clone() for w in h.w0]
    alphas, products = [0.5, 2.0, -1.5], []
    for task, alpha in enumerate(alphas):
        products.append(_train_randomly(h, task, alpha, seed=task))
        h.end_task(task, None, lambda line: None)
    # by hand: p_t = prune and rescale alpha_t * (alpha/r) B_t A_t, per layer
    p = [[ham.rescale_to_norm(ham.prune_by_magnitude(a * SCALE * ba, 0.5), a * SCALE * ba) for ba in prods]
         for a, prods in zip(alphas, products)]
    cos = lambda x, y: torch.stack([F.cosine_similarity(u.flatten(), v.flatten(), 0) for u, v in zip(x, y)]).mean()
    # task 1 opens group 1, task 2 group 2 (threshold 1 > every cosine); task 3 joins the more similar one
    joined = 0 if cos(p[2], p[0]) > cos(p[2], p[1]) else 1
    other = 1 - joined
    w = [abs(a) for a in alphas]
    for l, layer in enumerate(h.layers):
        group_joined = (w[joined] * p[joined][l] + w[2] * p[2][l]) / (w[joined] + w[2])  # importance-weighted mean
        want = w0[l] + group_joined + p[other][l]  # groups add
        torch.testing.assert_close(layer.base.weight, want, atol=1e-6, rtol=1e-5)
        assert layer.B.abs().sum() == 0 and layer.importance is None  # the adapter is empty after folding
    assert h.summary()["groups"] == ([[1, 3], [2]] if joined == 0 else [[1], [2, 3]])


def test_consolidate_does_not_modify_its_inputs():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 4, generator=g), torch.randn(3, 5, generator=g)]
    group = ham.Group((0,), tuple(torch.randn(d.shape, generator=g) for d in deltas), 1.5)
    before = [d.clone() for d in deltas], [t.clone() for t in group.weighted_sum]
    groups, index, sims = ham.consolidate(deltas, 0.7, [group], task=1, density=0.3, max_groups=1, threshold=0.3,
                                          tasks_left=1, merge="mean")
    assert all(torch.equal(a, b) for a, b in zip(deltas, before[0]))
    assert all(torch.equal(a, b) for a, b in zip(group.weighted_sum, before[1])) and group.members == (0,)
    assert index == 0 and groups[0].members == (0, 1) and groups[0].weight == pytest.approx(1.5 + 0.7)
    assert len(sims) == 1


def test_stored_state_round_trips():
    h, _ = _ham(4, density=0.2, max_groups=2, threshold=0.3, merge="mean")
    for task in range(3):
        _train_randomly(h, task, 1.0 + task, seed=task)
        h.end_task(task, None, lambda line: None)
    state = h.state_dict()
    fresh, _ = _ham(4, density=0.2, max_groups=2, threshold=0.3, merge="mean")
    fresh.load_state_dict(state)
    assert [g.members for g in fresh.groups] == [g.members for g in h.groups]
    for a, b in zip(ham.merged_delta(fresh.groups, "mean"), ham.merged_delta(h.groups, "mean")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("argv,message", [
    (["--density", "0"], "--density must be in (0, 1]"),
    (["--density", "1.5"], "--density must be in (0, 1]"),
    (["--groups", "0"], "--groups must be at least 1"),
    (["--threshold", "2"], "--threshold is a cosine"),
    (["--merge", "max"], "invalid choice"),
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


def test_groups_equal_to_tasks_is_no_merging(tmp_path):
    r = ham.main([*TINY, "--tasks", "5", "--epochs", "1", "--train-per-class", "4", "--groups", "5",
                  "--out", str(tmp_path)])
    assert r["groups"] == [[1], [2], [3], [4], [5]]
