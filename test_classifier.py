"""classifier.py: the Gaussian statistics, the sampler, classifier alignment, the nearest class mean, and the
baselines that run on them (baselines.py)."""
import json

import pytest
import torch
import torch.nn.functional as F

from classifier import Classifier, align_head_, class_statistics, compensate_drift, ncm_head_, sample_features
from conftest import TINY, learned, run_script
import treelora


def random_gaussians(C: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(C, D, generator=g)
    M = torch.randn(C, D, D, generator=g)
    covs = M @ M.transpose(1, 2) / D + 0.1 * torch.eye(D)  # (C, D, D), positive definite
    return means, covs


def test_statistics_are_the_mean_and_the_ridged_sample_covariance():
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(60, 6, generator=g) * torch.arange(1, 7), torch.arange(60) % 3 + 4
    means, factors = class_statistics(feats, labels, range(4, 7), ridge=1e-3)
    for c, k in enumerate(range(4, 7)):
        f = feats[labels == k].double()
        cov = torch.cov(f.T)
        cov += 1e-3 * cov.trace() / 6 * torch.eye(6, dtype=torch.float64)
        assert torch.allclose(means[c].double(), f.mean(0), atol=1e-6)
        assert torch.allclose((factors[c] @ factors[c].T).double(), cov, rtol=1e-5, atol=1e-5)
        assert torch.equal(factors[c], torch.tril(factors[c]))


def test_sampled_features_reproduce_the_stored_mean_and_covariance():
    """200,000 draws per class: the standard error of a covariance entry of size ~1 is about 0.003."""
    means, covs = random_gaussians(C=3, D=5)
    factors = torch.linalg.cholesky(covs)
    x, y = sample_features(means, factors, 200_000, torch.Generator().manual_seed(0))
    assert x.shape == (600_000, 5) and torch.equal(y, torch.arange(3).repeat_interleave(200_000))
    for c in range(3):
        xc = x[y == c].double()
        assert (xc.mean(0) - means[c]).abs().max() < 0.02
        assert (torch.cov(xc.T) - covs[c]).abs().max() < 0.03


def test_ncm_head_is_the_cosine_to_the_class_means_by_hand():
    weight, bias = torch.full((4, 2), 7.0), torch.full((4,), 5.0)
    ncm_head_(weight, bias, torch.tensor([[3.0, 4.0], [0.0, -2.0], [-1.0, 0.0]]))
    assert torch.allclose(weight[:3], torch.tensor([[0.6, 0.8], [0.0, -1.0], [-1.0, 0.0]]))
    assert torch.equal(bias[:3], torch.zeros(3)) and torch.equal(weight[3], torch.full((2,), 7.0))  # unseen row kept
    f = torch.tensor([[1.0, 1.0], [0.1, -1.0], [-5.0, 0.2]])
    # cosines by hand: f0 to (0.6, 0.8) is 1.4/sqrt(2) (the largest); f1 is closest to (0, -1); f2 to (-1, 0)
    assert (f @ weight[:3].T + bias[:3]).argmax(1).tolist() == [0, 1, 2]


def biased_clusters(seed: int = 0):
    """Two tasks of two classes in 8 dimensions, and a head as the masked cross-entropy leaves it: each task's
    rows fit only that task, and the newer rows answer with larger logits on everything."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(4, 8)
    centres[0, 0], centres[1, 1], centres[2, 2], centres[3, 3] = 4.0, 4.0, 4.0, 4.0
    centres += 2.0  # features share a common component, as a ViT's do
    feats = centres.repeat_interleave(200, 0) + 0.5 * torch.randn(800, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(200)
    weight, bias = torch.zeros(4, 8), torch.zeros(4)
    for task, scale in ((0, 1.0), (1, 3.0)):  # masked training: the later task's rows end larger
        lo = 2 * task
        w = torch.zeros(2, 8, requires_grad=True)
        b = torch.zeros(2, requires_grad=True)
        opt = torch.optim.SGD([w, b], lr=0.5)
        m = (labels >= lo) & (labels < lo + 2)
        for _ in range(200):
            loss = F.cross_entropy(F.linear(feats[m], w, b), labels[m] - lo)
            opt.zero_grad()
            loss.backward()
            opt.step()
        weight[lo:lo + 2], bias[lo:lo + 2] = scale * w.detach(), scale * b.detach()
        weight[lo:lo + 2] += scale * 0.5  # and lean toward the shared component
    return feats, labels, weight, bias


def test_alignment_stops_the_masked_head_calling_old_classes_new():
    feats, labels, weight, bias = biased_clusters()
    old = labels < 2
    masked = F.linear(feats, weight, bias).argmax(1)
    assert (masked[old] >= 2).float().mean() > 0.9  # the failure: old images are called the new task's classes
    means, factors = class_statistics(feats, labels, range(4))
    align_head_(weight, bias, means, factors, torch.Generator().manual_seed(0))
    aligned = F.linear(feats, weight, bias).argmax(1)
    assert (aligned == labels).float().mean() > 0.98


def test_classifier_keeps_statistics_per_seen_class():
    head = torch.nn.Linear(8, 4)
    feats, labels, *_ = biased_clusters()
    c = Classifier("align", head)
    c.end_task_(feats[labels < 2], labels[labels < 2], range(0, 2), torch.Generator().manual_seed(0))
    c.end_task_(feats[labels >= 2], labels[labels >= 2], range(2, 4), torch.Generator().manual_seed(1))
    assert c.means.shape == (4, 8) and c.factors.shape == (4, 8, 8)
    assert sum(t.numel() for t in c.stored_tensors()) == 4 * 8 + 4 * 64
    restored = Classifier("align", torch.nn.Linear(8, 4))
    restored.load_state_dict(c.state_dict())
    assert torch.equal(restored.means, c.means) and torch.equal(restored.factors, c.factors)
    assert Classifier("ncm", head).stored_tensors() == [] and Classifier("linear", head).needs_features is False
    with pytest.raises(ValueError):
        Classifier("svm", head)


def test_runs_record_the_statistics_in_stored_params(tmp_path):
    """Synthetic data, 4 tasks of 25 classes on vit_nano (width 48): align keeps 100 means and covariances."""
    base = [*TINY, "--tasks", "4", "--epochs", "1", "--train-per-class", "4", "--lam", "0", "--grad-density", "1"]
    stored = {}
    for kind in ("linear", "ncm", "align"):  # in this process: the count is what matters, not the command line
        stored[kind] = treelora.main([*base, "--classifier", kind, "--out", str(tmp_path / kind)])["stored_params"]
    assert stored["ncm"] - stored["linear"] == 100 * 48
    assert stored["align"] - stored["linear"] == 100 * 48 + 100 * 48 * 48


def test_baselines_run_and_write_results(tmp_path):
    base = [*TINY, "--tasks", "4", "--epochs", "2", "--train-per-class", "8"]
    run_script("baselines", [*base, "--baseline", "frozen", "--classifier", "ncm", "--out", str(tmp_path / "ncm")])
    r = json.loads((tmp_path / "ncm" / "results.json").read_text())
    assert r["method"] == "ncm" and r["trainable_params"] == 0 and r["finished"] and learned(r)
    log = (tmp_path / "ncm" / "log.txt").read_text()
    assert log.count("nothing to train") == 4 and "epoch 1/2" not in log  # one feature pass per task, no training
    run_script("baselines", [*base, "--baseline", "joint", "--classifier", "align", "--lr", "5e-3", "--head-lr", "5e-3",
                             "--out", str(tmp_path / "joint")])  # the random-init protocol: a fast LoRA learns
    j = json.loads((tmp_path / "joint" / "results.json").read_text())
    assert j["method"] == "joint" and len(j["accuracy_matrix"]) == 1 and j["config"]["tasks"] == 1
    assert j["metrics"]["A_last"] > 3  # 100 classes at once: chance is 1%


def test_drift_compensation_moves_each_mean_by_the_drift_near_it():
    """Two clusters of the new task's images drift differently; an old mean beside each follows its cluster."""
    g = torch.Generator().manual_seed(0)
    before = torch.cat([torch.randn(50, 3, generator=g) * 0.1, 10 + torch.randn(50, 3, generator=g) * 0.1])
    shift = torch.cat([torch.tensor([1.0, 0, 0]).expand(50, 3), torch.tensor([0, -2.0, 0]).expand(50, 3)])
    means = torch.tensor([[0.2, 0.0, 0.0], [10.0, 10.0, 9.8]])
    labels = torch.arange(100) // 50
    moved = compensate_drift(means, before, before + shift, labels)
    assert torch.allclose(moved - means, torch.tensor([[1.0, 0, 0], [0, -2.0, 0]]), atol=1e-4)
    same = compensate_drift(means, before, before + torch.tensor([0.5, 0.5, 0.5]), labels)  # a uniform drift: all follow
    assert torch.allclose(same - means, torch.full((2, 3), 0.5), atol=1e-5)
