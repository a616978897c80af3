"""trm.py: the trajectory subspace, the objectives against hand computations, constant storage, a tiny run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import ham
import trm

HERE = Path(__file__).parent
seeds = st.integers(0, 2**31 - 1)


def lora_trajectory(seed: int, K: int, d: int, k: int, r: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A previous merged delta and K snapshots taken the way TRM takes them: LoRALinear.delta()."""
    torch.manual_seed(seed)
    layer = ham.LoRALinear(torch.nn.Linear(k, d), rank=r, lora_alpha=2 * r)
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


@given(seeds, st.integers(2, 6), st.floats(0.1, 5.0))
def test_fisher_trace_is_the_expected_squared_score(seed, C, scale):
    z = scale * torch.randn(C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = z.softmax(0)
    expected = 0.0
    for y in range(C):  # exact expectation over y ~ p of |grad_z log p_y|^2
        zz = z.clone().requires_grad_()
        (g,) = torch.autograd.grad(torch.log_softmax(zz, 0)[y], zz)
        expected += p[y] * (g**2).sum()
    got = trm.logit_fisher_trace(z[None])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, 1 - (p**2).sum(), rtol=1e-10, atol=1e-12)


def test_sampled_labels_agree_with_the_fisher_trace_on_average():
    z = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    p = z.softmax(-1)[0]
    y = torch.multinomial(p, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    scores = torch.nn.functional.one_hot(y, 4).double() - p.double()  # grad_z log p_y = e_y - p
    torch.testing.assert_close((scores**2).sum(1).mean().float(), trm.logit_fisher_trace(z), atol=0.01, rtol=0)


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
    # responsiveness: no penalty while the Fisher trace keeps rho of its value, a penalty once it collapses
    assert trm.gradient_responsiveness(logits, logits, 1.0) == 0
    saturated = 50 * logits
    assert trm.gradient_responsiveness(saturated, logits, 0.9) > 0
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


TINY = ["--dataset", "synthetic", "--backbone", "vit_nano", "--batch-size", "32"]


def test_storage_does_not_grow_with_tasks(tmp_path):
    r = trm.main(TINY + ["--tasks", "10", "--epochs", "1", "--train-per-class", "4", "--merge-steps", "2",
                         "--out", str(tmp_path)])
    after_2, after_6 = r["tasks"][1], r["tasks"][5]
    assert after_2["stored_tensors"] == after_6["stored_tensors"] == 2 * 2  # W0 and M for 2 qkv layers
    assert after_2["stored_params"] == after_6["stored_params"] > 0


def test_zero_merge_steps_is_the_plain_sequential_merge(tmp_path):
    r = trm.main(TINY + ["--tasks", "2", "--epochs", "2", "--train-per-class", "8", "--merge-steps", "0",
                         "--out", str(tmp_path)])
    for task in r["tasks"]:
        assert task["coefficients"] == trm.initial_coefficients(2, 2).tolist()


def test_end_to_end_synthetic(tmp_path):
    argv = TINY + ["--tasks", "4", "--epochs", "2", "--train-per-class", "24", "--merge-steps", "10",
                   "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "trm.py", *argv], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["finished"] and r["synthetic_data"] and r["method"] == "trm"
    assert r["metrics"]["A_last"] > 2 * 1.0  # chance is 1%
    last = r["tasks"][-1]
    assert set(last["objectives_start"]) == {"alignment", "consistency", "responsiveness", "trust"}
    assert last["objectives_start"]["trust"] == 0 and last["first_step_grad_norm"] > 0
    assert r["tasks"][0]["objectives_start"]["consistency"] == 0  # no old classes in the first task
    assert "TRM merge:" in proc.stdout
