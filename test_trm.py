"""trm.py: the trajectory subspace, the objectives against hand computations, constant storage, a tiny run."""
import json

import pytest
import torch
from hypothesis import given, strategies as st

import continual
import trm
from conftest import TINY, assert_mechanism_drawn, learned, run_script
from lora_vit import PRESETS, LoRALinear, ViT, add_lora_

seeds = st.integers(0, 2**31 - 1)


def lora_trajectory(seed: int, K: int, d: int, k: int, r: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A previous merged delta and K snapshots taken the way TRM takes them: LoRALinear.delta()."""
    torch.manual_seed(seed)
    layer = LoRALinear(torch.nn.Linear(k, d), rank=r, lora_alpha=2 * r)
    prev = torch.randn(d, k)
    snaps = []
    for _ in range(K):
        torch.nn.init.normal_(layer.B)
        torch.nn.init.normal_(layer.A)
        snaps.append(layer.delta().detach().clone())
    return prev, snaps


@given(seeds, st.integers(1, 5), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4))
def test_initial_coefficients_give_the_plain_merge_exactly(seed, K, d, k, r):
    prev, snaps = lora_trajectory(seed, K, d, k, r)
    c_init = trm.initial_coefficients(1, K)[0]
    assert torch.equal(trm.trajectory_merge(prev, torch.stack(snaps), c_init), prev + snaps[-1])


@given(seeds, st.integers(1, 4), st.integers(3, 8), st.integers(3, 8))
def test_merged_delta_stays_in_the_augmented_span(seed, K, d, k):
    prev, snaps = lora_trajectory(seed, K, d, k, 2)
    c = torch.randn(K + 1, generator=torch.Generator().manual_seed(seed))
    moved = (trm.trajectory_merge(prev, torch.stack(snaps), c) - prev).double().flatten()
    basis = torch.stack([*snaps, prev]).double().flatten(1).T  # (d*k, K+1)
    solution = torch.linalg.lstsq(basis, moved[:, None]).solution
    residual = (basis @ solution).squeeze(1) - moved
    assert residual.norm() <= 1e-5 * (1 + moved.norm())


def test_merge_is_linear_in_the_coefficients():
    prev, snaps = lora_trajectory(0, 3, 4, 5, 2)
    D = torch.stack(snaps)
    c = torch.tensor([0.5, -1.0, 2.0, 0.25])
    want = prev + 0.5 * snaps[0] - 1.0 * snaps[1] + 2.0 * snaps[2] + 0.25 * prev  # written out by hand
    torch.testing.assert_close(trm.trajectory_merge(prev, D, c), want)


@given(seeds, st.integers(2, 12), st.integers(1, 6))
def test_feature_fisher_trace_is_the_trace_of_the_covariance(seed, B, D):
    f = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reference = torch.cov(f.T, correction=0).reshape(D, D).trace()  # torch's covariance, biased (1/B)
    torch.testing.assert_close(trm.feature_fisher_trace(f), reference)


def test_responsiveness_sees_a_rigid_merge():
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(32, 16, generator=g)
    assert trm.gradient_responsiveness(healthy, healthy, 0.5) == 0  # the merge kept the features
    assert trm.gradient_responsiveness(0.8 * healthy, healthy, 0.5) == 0  # shrunk a little: within rho
    collapsed = healthy.mean(0, keepdim=True).expand(32, 16) + 1e-3 * torch.randn(32, 16, generator=g)
    value = trm.gradient_responsiveness(collapsed, healthy, 0.5)  # every input alike: nothing for a head to learn
    assert value > 0.4 * trm.feature_fisher_trace(healthy)


def test_objectives_vanish_where_they_should():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    # prediction consistency: zero at the previous merged model, and zero with no old classes (first task)
    assert trm.prediction_consistency(logits[:, :6], logits[:, :6], 2.0).abs() < 1e-6
    assert trm.prediction_consistency(logits[:, :0], logits[:, :0], 2.0) == 0
    assert trm.prediction_consistency(logits[:, :6] + torch.randn(8, 6, generator=g), logits[:, :6], 2.0) > 0
    # task alignment at the fine-tuned endpoint is the cross-entropy alone
    torch.testing.assert_close(trm.task_alignment(logits[:, 6:], logits[:, 6:], y, 2.0),
                               torch.nn.functional.cross_entropy(logits[:, 6:], y))
    # trust region
    c = trm.initial_coefficients(3, 4)
    assert trm.trust_region(c, c) == 0 and trm.trust_region(c + 0.1, c) > 0


def test_distillation_is_minimal_at_the_teacher():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(5, 7, generator=g)
    student = teacher.clone().requires_grad_()
    loss = trm.distill_kl(teacher, student, 2.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.abs() < 1e-6 and grad.abs().max() < 1e-6
    assert trm.distill_kl(teacher, teacher + torch.randn(5, 7, generator=g), 2.0) > 0


@pytest.mark.parametrize("epochs,K,want", [(5, 5, [0, 1, 2, 3, 4]), (5, 1, [4]), (10, 3, [2, 6, 9]), (3, 2, [1, 2])])
def test_snapshot_epochs(epochs, K, want):
    assert trm.snapshot_epochs(epochs, K) == want


@pytest.mark.parametrize("argv,message", [
    (["--merge-steps", "-1"], "--merge-steps must be at least 0"),
    (["--snapshots", "30"], "--snapshots must be between 0"),
    (["--rho", "-1"], "--rho must be a non-negative number"),
    (["--temperature", "0"], "--temperature must be a positive number"),
    (["--merge-lr", "inf"], "--merge-lr must be a positive number"),
])
def test_bad_flags(argv, message, usage_error):
    assert message in usage_error(trm.Args, argv)


class FixedBatches:
    """The same batch at every step: a merge's objective can then be compared before and after."""

    ranks, shard_weight = continual.SINGLE, 1.0  # one process, as TaskBatches outside torchrun

    def __init__(self, x, y, classes: range):
        self.x, self.y, self.classes = x, y, classes

    def __len__(self):
        return 1

    def __iter__(self):
        yield self.x, self.y


def _trm(merge_steps: int, **kw) -> trm.TRM:
    torch.manual_seed(0)
    model = ViT(PRESETS["vit_nano"], num_classes=100)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    add_lora_(model, ["qkv"], rank=4, lora_alpha=4.0)
    weights = dict(lam_pc=1.0, lam_gr=1.0, rho=0.5, mu=1.0, temperature=2.0) | kw
    return trm.TRM(model, snapshot_at=[0, 1], merge_steps=merge_steps, merge_lr=0.05, **weights)


def _task(method: trm.TRM, task: int, batches, seed: int) -> list[list[torch.Tensor]]:
    """Two epochs of 'training' with random adapters: the snapshots the method takes."""
    method.begin_task(task, batches)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(2):
        with torch.no_grad():
            for layer in method.layers:
                layer.B.copy_(0.05 * torch.randn(layer.B.shape, generator=g))
        method.end_epoch(epoch)
    return [list(s) for s in method.trajectory]


def _fixed_batch(task: int) -> FixedBatches:
    g = torch.Generator().manual_seed(task)
    return FixedBatches(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g),
                        range(10 * task, 10 * task + 10))


def test_zero_merge_steps_fold_the_plain_sequential_merge():
    method = _trm(merge_steps=0)
    w0 = [w.clone() for w in method.w0]
    ends = []
    for task in range(2):
        trajectory = _task(method, task, _fixed_batch(task), seed=task)
        ends.append(trajectory[-1])  # D_K, the task's final delta
        info = method.end_task(task, _fixed_batch(task), lambda line: None)
        assert info["coefficients"] == trm.initial_coefficients(len(method.layers), 2).tolist()
    for l, layer in enumerate(method.layers):
        assert torch.equal(layer.base.weight, w0[l] + (torch.zeros_like(w0[l]) + ends[0][l] + ends[1][l]))


def test_the_merge_lowers_its_objective_and_folds_m_of_c_star():
    method = _trm(merge_steps=30)
    _task(method, 0, _fixed_batch(0), seed=0)
    method.end_task(0, _fixed_batch(0), lambda line: None)
    batches = _fixed_batch(1)
    trajectory = _task(method, 1, batches, seed=1)
    prev = [m.clone() for m in method.merged]
    directions = [torch.stack([snap[l] for snap in trajectory]) for l in range(len(method.layers))]
    for layer in method.layers:
        layer.reset_adapter_()

    def objective(c: torch.Tensor) -> float:
        previous_w = [w + m for w, m in zip(method.w0, prev)]
        endpoint_w = [w + d[-1] for w, d in zip(previous_w, directions)]
        head = (method.model.head.weight[:20], method.model.head.bias[:20])
        logits = lambda weights: torch.nn.functional.linear(method._features(weights, batches.x), *head)
        with torch.no_grad():
            terms = trm.merge_objective(
                c, w0=method.w0, prev=prev, directions=directions, features_of=method._features, head=head,
                x=batches.x, y=batches.y, classes=batches.classes, endpoint=logits(endpoint_w),
                previous=logits(previous_w), previous_features=method._features(previous_w, batches.x),
                c_init=c_init, **method.weights)
        return terms["total"].item()

    c_init = trm.initial_coefficients(len(method.layers), 2)
    info = method.end_task(1, batches, lambda line: None)
    c_star = torch.tensor(info["coefficients"])
    assert objective(c_star) < objective(c_init) - 1e-4
    # the log's before/after are the same objective on the same (fixed) batch
    assert info["objectives_before"]["total"] == pytest.approx(objective(c_init), rel=1e-5)
    assert info["objectives_after"]["total"] == pytest.approx(objective(c_star), rel=1e-5)
    for layer, w0, m, d, c in zip(method.layers, method.w0, prev, directions, c_star):
        torch.testing.assert_close(layer.base.weight, w0 + trm.trajectory_merge(m, d, c))
    assert not torch.equal(c_star, c_init)


def test_first_step_gradient_norm_covers_every_trained_parameter():
    method = _trm(merge_steps=0)
    trained = method.begin_task(0, None)
    g = torch.Generator().manual_seed(0)
    for p in trained:
        p.grad = torch.randn(p.shape, generator=g)
    method.after_backward()
    want = torch.sqrt(sum((p.grad**2).sum() for p in trained))
    torch.testing.assert_close(method.first_grad_norm, want)
    for p in trained:
        p.grad = torch.zeros_like(p)
    method.after_backward()  # later steps do not overwrite the first step's norm
    torch.testing.assert_close(method.first_grad_norm, want)


def test_storage_does_not_grow_with_tasks(tmp_path):
    r = trm.main([*TINY, "--tasks", "10", "--epochs", "1", "--train-per-class", "4", "--merge-steps", "2",
                  "--out", str(tmp_path)])
    after_2, after_6 = r["tasks"][1], r["tasks"][5]
    assert after_2["stored_tensors"] == after_6["stored_tensors"] == 2 * 2  # W0 and M for 2 qkv layers
    assert after_2["stored_params"] == after_6["stored_params"] > 0
    # every merge's cost is in the run's record: its steps, seconds, seconds per step
    assert all(t["merge_steps"] == 2 and t["merge_seconds"] > 0 and
               t["merge_step_seconds"] == pytest.approx(t["merge_seconds"] / 2) for t in r["tasks"])


def test_the_plain_merge_runs_and_draws_its_coefficients(tmp_path, capsys):
    """--merge-steps 0 (the plain merge ablation) optimises nothing, so it records no objectives; its run still
    finishes and its mechanism picture still draws."""
    r = trm.main([*TINY, "--tasks", "2", "--epochs", "1", "--train-per-class", "4", "--merge-steps", "0",
                  "--out", str(tmp_path)])
    assert r["finished"] and all("objectives_after" not in t for t in r["tasks"])
    assert all(t["merge_steps"] == 0 and t["merge_step_seconds"] is None for t in r["tasks"])
    assert_mechanism_drawn(tmp_path, capsys.readouterr().out)


def test_end_to_end_synthetic(tmp_path):
    argv = [*TINY, "--tasks", "4", "--epochs", "3", "--train-per-class", "24", "--merge-steps", "10",
            "--out", str(tmp_path)]
    stdout = run_script("trm", argv).stdout
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["finished"] and r["synthetic_data"] and r["method"] == "trm" and learned(r)
    last = r["tasks"][-1]
    assert set(last["objectives_before"]) == {"alignment", "consistency", "responsiveness", "trust", "total",
                                              "old_predictions_kept"}
    assert r["tasks"][0]["objectives_before"]["old_predictions_kept"] == 1.0  # no old classes yet
    assert 0 <= last["objectives_after"]["old_predictions_kept"] <= 1
    assert last["objectives_before"]["trust"] == 0 and last["objectives_after"]["trust"] > 0
    assert r["tasks"][0]["objectives_before"]["consistency"] == 0  # no old classes in the first task
    assert "TRM merge, on its first batch:" in stdout and "responsiveness hinge" in stdout
    assert_mechanism_drawn(tmp_path, stdout)


def test_snapshots_are_held_once_while_merging(monkeypatch):
    """The merge works on the stacked directions; the trajectory's own copies are gone before it starts."""
    method = _trm(merge_steps=2)
    _task(method, 0, _fixed_batch(0), seed=0)
    snapshots = [t for snap in method.trajectory for t in snap]
    seen = {}
    real = trm.initial_coefficients

    def spy(*args, **kwargs):  # called after the directions are stacked, before the merge's first step
        seen["trajectory"] = list(method.trajectory)
        return real(*args, **kwargs)

    monkeypatch.setattr(trm, "initial_coefficients", spy)
    method.end_task(0, _fixed_batch(0), lambda line: None)
    assert seen["trajectory"] == [] and len(snapshots) == 2 * len(method.layers)


def test_old_predictions_kept_counts_agreeing_argmaxes_by_hand():
    """On a batch of 4 with 2 old classes: the merged model agrees with the previous one on 3 of 4 images."""
    torch.manual_seed(0)
    w0 = [torch.zeros(2, 2)]
    prev, directions = [torch.zeros(2, 2)], torch.zeros(1, 1, 2, 2)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    head = (torch.eye(3, 2), torch.zeros(3))  # class 2 (the new task) scores 0
    previous = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 0.0], [0.0, 2.0, 0.0]])
    terms = trm.merge_objective(trm.initial_coefficients(1, 1), w0=w0, prev=prev, directions=[directions[0]],
                                features_of=lambda weights, x: feats, head=head, x=feats, y=torch.zeros(4, dtype=torch.long),
                                classes=range(2, 3), endpoint=torch.zeros(4, 3), previous=previous,
                                previous_features=feats, temperature=2.0, rho=0.5, lam_pc=1.0, lam_gr=1.0, mu=0.1,
                                c_init=trm.initial_coefficients(1, 1))
    assert terms["old_predictions_kept"].item() == 0.75  # image 3: merged says class 0, previous class 1
