"""The ridge head (RanPAC), its lambda, the linear drift map, the oracle, the heads kept beside a run and the
first-session baseline: each against a direct computation or a run that must agree with it."""
import json
import math

import pytest
import torch
import torch.nn as nn

import classifier
from hypothesis import given, strategies as st

import continual
import treelora
from classifier import (Classifier, adversarial_means, adversarial_pairs, choose_lambda, choose_map_ridge,
                        carry, choose_map_ridge_by_class, class_statistics, gaussian_gram, ldc_projector,
                        linear_drift_map, ncm_means, one_hot, project, ridge_solve)
from conftest import TINY, interrupt_evaluation, learned, run_script
from flags import CLArgs


def blobs(n_classes: int, per_class: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters: features (n_classes * per_class, dim), labels 0..n_classes-1 in class order."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(n_classes, dim, generator=g)
    feats = centres.repeat_interleave(per_class, 0) + torch.randn(n_classes * per_class, dim, generator=g)
    return feats, torch.arange(n_classes).repeat_interleave(per_class)


@given(cuts=st.lists(st.integers(1, 5), min_size=1, max_size=4, unique=True), width=st.sampled_from([0, 7, 40]))
def test_streaming_ridge_head_equals_one_fit_on_every_seen_class(cuts, width):
    """Any split of 6 classes into tasks: G and Q summed task by task give the weights of one ridge fit on all."""
    feats, labels = blobs(6, 10, 5)
    projection = torch.randn(5, width, generator=torch.Generator().manual_seed(1)) if width else None
    lam = 0.3
    c = Classifier("ridge", torch.nn.Linear(5, 6), projection=projection, lambdas=(lam,))
    bounds = [0, *sorted(cuts), 6]
    for lo, hi in zip(bounds, bounds[1:]):
        m = (labels >= lo) & (labels < hi)
        c.end_task_(feats[m], labels[m], range(lo, hi), torch.Generator().manual_seed(lo))
    H = feats.double() if width == 0 else torch.relu(feats.double() @ projection.double())
    Y = torch.nn.functional.one_hot(labels, 6).double()
    direct = torch.linalg.solve(H.T @ H + lam * torch.eye(H.shape[1], dtype=torch.float64), H.T @ Y)
    assert c.lam == lam and c.ridge_weight.shape == direct.shape
    assert torch.allclose(c.ridge_weight.double(), direct, rtol=1e-4, atol=1e-5)
    logits = c.logits(feats, 6)
    assert torch.allclose(logits.double(), H @ direct, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("width", [3, 50])  # fewer fitting rows than M (the dual) and more (the primal)
def test_lambda_choice_is_the_brute_force_one(width):
    """RanPAC's rule computed by one solve per lambda, as its code does, on the same 80/20 split."""
    feats, labels = blobs(3, 12, 6, seed=2)
    h = project(feats, torch.randn(6, width, generator=torch.Generator().manual_seed(3)))
    y = one_hot(labels, range(3))
    grid = tuple(10.0 ** k for k in range(-4, 5))
    lam, errors = choose_lambda(h, y, grid, torch.Generator().manual_seed(7))
    order = torch.randperm(len(h), generator=torch.Generator().manual_seed(7))
    fit, val = order[:28], order[28:]  # int(36 * 0.8) = 28
    brute = []
    for k in grid:
        W = torch.linalg.solve(h[fit].T @ h[fit] + k * torch.eye(width, dtype=torch.float64), h[fit].T @ y[fit])
        brute.append(((h[val] @ W - y[val]) ** 2).mean().item())
    assert errors == pytest.approx(brute, rel=1e-6, abs=1e-9)
    assert lam == grid[brute.index(min(brute))]


def test_ridge_solve_is_the_regularised_normal_equations():
    G = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    Q = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    # (G + I)^-1 Q by hand: [[3, 1], [1, 4]]^-1 = [[4, -1], [-1, 3]] / 11, times (1, 2) = (2, 5) / 11
    assert torch.allclose(ridge_solve(G, Q, 1.0), torch.tensor([[2 / 11], [5 / 11]], dtype=torch.float64))


def test_a_linear_drift_carries_every_statistic_exactly():
    """Features that move by an exact linear map A: the fitted map recovers A; carried through A, the stored means,
    covariances, G and Q equal the statistics of the moved features; and a task's end applies the fitted map."""
    feats, labels = blobs(4, 40, 6, seed=4)
    A = torch.eye(6) + 0.3 * torch.randn(6, 6, generator=torch.Generator().manual_seed(5))
    moved = feats @ A
    old, new = labels < 2, labels >= 2
    fitted = linear_drift_map(feats[new], moved[new])
    assert torch.allclose(fitted.float(), A, atol=1e-3)  # up to the ridge toward the identity
    for kind in ("align", "ncm", "ridge"):
        c = Classifier(kind, torch.nn.Linear(6, 4), drift="linear", lambdas=(1.0,))
        c.end_task_(feats[old], labels[old], range(0, 2), torch.Generator().manual_seed(0))
        c._transform(A.double())
        if kind == "ridge":
            m64 = feats[old].double() @ A.double()
            G, Q = m64.T @ m64, m64.T @ one_hot(labels[old], range(2))
            assert torch.allclose(c.G, G, rtol=1e-9) and torch.allclose(c.Q, Q, rtol=1e-9, atol=1e-9)
        else:
            means, factors = class_statistics(moved, labels, range(2))
            assert torch.allclose(c.means, means, atol=1e-5)
            if kind == "align":  # A^T L L^T A = A^T (Sigma + ridge) A: the covariance carries exactly
                for k in range(2):
                    sigma = torch.cov(feats[labels == k].double().T)
                    carried = c.factors[k].double() @ c.factors[k].double().T
                    expected = A.double().T @ (sigma + 1e-4 * sigma.trace() / 6 * torch.eye(6, dtype=torch.float64)) @ A.double()
                    assert torch.allclose(carried, expected, rtol=1e-5, atol=1e-5)
        end = Classifier(kind, torch.nn.Linear(6, 4), drift="linear", lambdas=(1.0,))  # the whole step
        end.end_task_(feats[old], labels[old], range(0, 2), torch.Generator().manual_seed(0))
        end.end_task_(moved[new], labels[new], range(2, 4), torch.Generator().manual_seed(1), before=feats[new])
        if kind == "ridge":
            G = moved.double().T @ moved.double()
            assert torch.allclose(end.G, G, rtol=1e-2, atol=1e-2 * G.abs().max().item())
        else:
            assert torch.allclose(end.means, class_statistics(moved, labels, range(4))[0], rtol=1e-2, atol=1e-2)


def test_the_oracle_recomputes_every_seen_class_from_the_current_features():
    feats, labels = blobs(4, 20, 5, seed=6)
    now = feats + 1.0  # the backbone moved: every feature shifts
    stale, oracle = (Classifier("ncm", torch.nn.Linear(5, 4), drift=d) for d in ("none", "oracle"))
    first = [(feats[labels < 2], labels[labels < 2], range(0, 2))]
    seen = [(now[labels < 2], labels[labels < 2], range(0, 2)), (now[labels >= 2], labels[labels >= 2], range(2, 4))]
    for c in (stale, oracle):
        c.end_task_(*first[0], torch.Generator(), seen=first)
        c.end_task_(*seen[1], torch.Generator(), seen=seen)
    by_hand = torch.stack([now[labels == k].mean(0) for k in range(4)])
    assert torch.allclose(oracle.means, by_hand, atol=1e-5)
    assert torch.allclose(stale.means[:2], torch.stack([feats[labels == k].mean(0) for k in range(2)]), atol=1e-5)


def test_a_head_kept_beside_changes_nothing_in_the_run():
    """A compared head works on its own copy of the rows: the model's head is left as the run's head made it."""
    feats, labels = blobs(2, 20, 5)
    head = torch.nn.Linear(5, 2)
    before = head.weight.detach().clone()
    side = Classifier("ncm", head, own=True)
    side.end_task_(feats, labels, range(0, 2), torch.Generator())
    assert torch.equal(head.weight, before) and not torch.equal(side.weight, before)


def test_projection_is_a_function_of_the_seed_alone():
    a = continual.random_projection(3, 8, 16, torch.device("cpu"))
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(a, continual.random_projection(3, 8, 16, torch.device("cpu")))
    assert not torch.equal(a, continual.random_projection(4, 8, 16, torch.device("cpu")))
    assert continual.random_projection(3, 8, 0, torch.device("cpu")) is None


def test_ridge_state_round_trips_through_a_checkpoint():
    feats, labels = blobs(2, 20, 5)
    projection = continual.random_projection(0, 5, 9, torch.device("cpu"))
    c = Classifier("ridge", torch.nn.Linear(5, 2), projection=projection)
    c.end_task_(feats, labels, range(0, 2), torch.Generator().manual_seed(0))
    assert sum(t.numel() for t in c.stored_tensors()) == 9 * 9 + 9 * 2  # G (M x M) and Q (M x C)
    restored = Classifier("ridge", torch.nn.Linear(5, 2), projection=projection)
    restored.load_state_dict(c.state_dict())
    assert torch.equal(restored.logits(feats, 2), c.logits(feats, 2)) and restored.lam == c.lam


RIDGE_BAD_FLAGS = [
    (["--rp-dim", "-1"], "--rp-dim must be at least 0"),
    (["--ridge-lambdas", ""], "the grid is empty"),
    (["--ridge-lambdas", "1e3:1e-3"], "the grid is empty"),
    (["--ridge-lambdas", "1,-2"], "every lambda must be a positive number"),
    (["--ridge-lambdas", "3:30"], "powers of ten"),
    (["--drift", "shift"], "invalid choice"),
    (["--classifier", "linear", "--drift", "adc"], "keeps no class statistics for adc to move"),
    (["--compare-heads", "linear/sdc"], "keeps no class statistics for sdc to move"),
    (["--compare-heads", "svm"], "--compare-heads 'svm'"),
    (["--compare-heads", "ridge,ridge"], "named twice"),
    (["--compare-heads", "ridge/shift"], "with one of"),
    (["--compare-heads", "align/gaussian"], "which the align head does not keep"),
    (["--compare-heads", "ncm/linear-h"], "which the ncm head does not have"),
    (["--draws", "0"], "--draws must be at least 1"),
]


@pytest.mark.parametrize("argv,message", RIDGE_BAD_FLAGS, ids=[" ".join(a) for a, _ in RIDGE_BAD_FLAGS])
def test_bad_ridge_flags_give_one_sentence(argv, message, usage_error):
    assert message in usage_error(CLArgs, argv)


BASE = [*TINY, "--tasks", "4", "--epochs", "1", "--train-per-class", "4", "--rp-dim", "64"]
SEQ = [*BASE, "--lam", "0", "--grad-density", "1"]


def test_a_head_beside_the_run_equals_a_run_with_that_head(tmp_path):
    """SeqLoRA's training does not read the head after a task, so the ridge head kept beside an aligned run is the
    ridge run's head, and the other way round, to the bit; an aligned head beside an aligned run is the run's."""
    run_script("treelora", [*SEQ, "--classifier", "align", "--compare-heads", "ridge,align", "--out", str(tmp_path / "a")])
    run_script("treelora", [*SEQ, "--classifier", "ridge", "--compare-heads", "align", "--out", str(tmp_path / "r")])
    a, r = (json.loads((tmp_path / k / "results.json").read_text()) for k in ("a", "r"))
    assert a["heads"]["ridge"]["accuracy_matrix"] == r["accuracy_matrix"]
    assert a["heads"]["align"]["accuracy_matrix"] == a["accuracy_matrix"]  # it starts from the rows as trained too
    c = torch.load(tmp_path / "a" / continual.CHECKPOINT, weights_only=True)
    assert torch.equal(c["compare_heads"]["align"]["weight"], c["model"]["head.weight"])
    assert r["heads"]["align"]["accuracy_matrix"] == a["accuracy_matrix"]
    assert a["heads"]["ridge"]["lambdas"] == [t["ridge_lambda"] for t in r["tasks"]]
    assert r["stored_params"] == 64 * 64 + 64 * 100  # G and Q over the 100 synthetic classes
    assert a["heads"]["ridge"]["stored_params"] == r["stored_params"]


def test_first_session_adapts_on_task_one_only(tmp_path):
    """Task 1 trains exactly as SeqLoRA's does; from then on the backbone never moves, so statistics taken after
    any task are what the oracle recomputes, and the plain ridge head with and without it agree to the bit; LDC's
    projector sees the same views under the backbone before and after each later task, so it stays the identity."""
    ridge = ["--classifier", "ridge", "--rp-dim", "0"]
    run_script("baselines", [*BASE, *ridge, "--baseline", "first-session", "--compare-heads", "ridge0/oracle,ridge0/ldc",
                             "--out", str(tmp_path / "first")])
    run_script("treelora", [*SEQ, *ridge, "--out", str(tmp_path / "seq")])
    first, seq = (json.loads((tmp_path / k / "results.json").read_text()) for k in ("first", "seq"))
    assert first["method"] == "first-session" and first["finished"] and learned(first)
    assert first["accuracy_matrix"][0] == seq["accuracy_matrix"][0]
    assert first["heads"]["ridge0/oracle"]["accuracy_matrix"] == first["accuracy_matrix"]
    assert first["heads"]["ridge0/ldc"]["accuracy_matrix"] == first["accuracy_matrix"]
    assert seq["accuracy_matrix"][-1] != first["accuracy_matrix"][-1]  # SeqLoRA's backbone moved on
    log = (tmp_path / "first" / "log.txt").read_text()
    assert log.count("nothing to train") == 3  # ridge replaces the head's rows: after task 1 nothing trains


def test_the_held_out_ridge_fits_a_real_drift_and_falls_back_to_no_drift_on_noise():
    g = torch.Generator().manual_seed(0)
    before = torch.randn(400, 8, generator=g, dtype=torch.float64)
    A = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    ridge, errors = choose_map_ridge(before, before @ A + 0.01 * torch.randn(400, 8, generator=g, dtype=torch.float64))
    assert ridge <= 1e-2 and errors[0] < errors[-1]  # many images, a linear drift: the map is fitted
    few = torch.randn(30, 64, generator=g, dtype=torch.float64)  # fewer images than dimensions, the "drift" noise
    ridge, errors = choose_map_ridge(few, few + 0.5 * torch.randn(30, 64, generator=g, dtype=torch.float64))
    # the map near the identity predicts held-out images best: a ridge 10,000 times the fixed one or more
    assert ridge >= 1e4 * classifier.RIDGE and errors[classifier.MAP_RIDGES.index(ridge)] < errors[0]


def test_the_class_held_out_ridge_fits_a_shared_drift_and_keeps_classes_that_drift_alone():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(100)
    before = torch.randn(400, 8, generator=g, dtype=torch.float64) + 3 * torch.randn(4, 8, generator=g,
                                                                                      dtype=torch.float64)[labels]
    A = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    ridge, errors = choose_map_ridge_by_class(before, before @ A, labels)
    assert ridge == classifier.CLASS_RIDGES[0] and errors[0] < errors[-1]  # one map for every class: fitted
    # each class moves by an offset of its own: another class's drift says nothing, the identity predicts best
    after = before + 2 * torch.randn(4, 8, generator=g, dtype=torch.float64)[labels]
    ridge, errors = choose_map_ridge_by_class(before, after, labels)
    assert ridge == classifier.CLASS_RIDGES[-1] and errors[-1] < errors[0]
    # the errors are the held-out classes' mean squared errors, summed (brute force for one candidate)
    r = classifier.CLASS_RIDGES[3]
    want = sum(((before[labels == k] @ linear_drift_map(before[labels != k], after[labels != k], r)
                 - after[labels == k]) ** 2).mean().item() for k in range(4))
    assert errors[3] == pytest.approx(want, rel=1e-9)
    assert choose_map_ridge_by_class(before[:100], after[:100], labels[:100]) == (classifier.CLASS_RIDGES[0], [])


def _linear_backbones(D: int = 6, pixels: int = 12, seed: int = 0):
    """A 'backbone' before the task, x -> x W, and after it, x -> x W + delta: every image drifts by delta."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(pixels, D, generator=g, dtype=torch.float64) / pixels ** 0.5
    delta = torch.randn(D, generator=g, dtype=torch.float64)
    old = lambda x: x.flatten(1).double() @ W
    return old, (lambda x: old(x) + delta), delta, g


def test_adversarial_pairs_push_images_toward_each_mean_and_measure_their_drift():
    old, new, delta, g = _linear_backbones()
    images = torch.randint(0, 256, (40, 3, 2, 2), generator=g, dtype=torch.uint8)
    prepare = lambda x: (x.double() / 255 - 0.5) / 0.25  # uint8 -> the model's input, range [-2, 2]
    before = old(prepare(images))
    means = before[[0, 1, 2]] + 0.2 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    target, f_old, f_new = adversarial_pairs(means, images, prepare, before, old, new, per_class=5, steps=3,
                                             step=0.05, chunk=4)
    assert len(target) > 0 and set(target.tolist()) <= {0, 1, 2}
    assert torch.allclose(f_new - f_old, delta.float().expand_as(f_old), atol=1e-5)  # each kept image's drift
    assert (torch.cdist(f_old.double(), means).argmin(1) == target).all()  # kept: the old nearest mean is its class
    # the pushed images are nearer their class's mean than the images they started from
    start = torch.cdist(means, before).topk(5, dim=1, largest=False).values.mean(1)
    after = torch.stack([(f_old[target == c] - means[c]).norm(dim=1).mean() for c in target.unique()])
    assert (after < start[target.unique()]).all()
    none, *_ = adversarial_pairs(means, images, prepare, before, old, new, per_class=5, steps=0, chunk=4)
    assert len(none) <= len(target)  # no steps: fewer images reach their class


def test_adversarial_means_move_a_class_by_its_pushed_images_drift_and_leave_the_others():
    means = torch.zeros(3, 2)
    target = torch.tensor([0, 0, 2])
    old = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    new = old + torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, -2.0]])
    moved = adversarial_means(means, target, old, new)
    assert torch.equal(moved, torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, -2.0]]))


@pytest.mark.parametrize("drift", ["adc", "adc-linear", "linear-cls"])
def test_a_remedy_moves_old_statistics_by_the_drift_it_is_shown(drift):
    """Every image's feature f moves to f A (the task's images and the pushed ones alike): the old means move to
    about mean A; adc by the pushed images' mean drift, the maps by the map fitted on the task's images."""
    g = torch.Generator().manual_seed(1)
    D = 5
    A = torch.eye(D) + 0.2 * torch.randn(D, D, generator=g)
    centres = 4 * torch.randn(4, D, generator=g)
    labels = torch.arange(4).repeat_interleave(40)
    feats = centres[labels] + torch.randn(160, D, generator=g)
    c = Classifier("ncm", nn.Linear(D, 4), drift)
    c.end_task_(feats[:80], labels[:80], range(0, 2), g)
    old_means = c.means.clone()
    calls = []

    def probe(means):
        calls.append(means.clone())
        target = torch.arange(len(means)).repeat_interleave(10)
        pushed = means[target] + 0.01 * torch.randn(len(target), D, generator=g)
        return target, pushed, pushed @ A

    c.end_task_(feats[80:] @ A, labels[80:], range(2, 4), g, before=feats[80:], probe=probe)
    assert len(calls) == drift.startswith("adc") and (not calls or torch.equal(calls[0], old_means))
    assert torch.allclose(c.means[:2], old_means @ A, atol=0.05 if drift == "adc" else 0.3)
    assert not torch.allclose(old_means, old_means @ A, atol=0.3)  # the drift is larger than the tolerance


def test_adc_heads_run_beside_a_run_without_changing_it(tmp_path):
    """ADC's heads push images through a frozen copy of the backbone before each task: the run itself (its own
    head, its weights) is the run without them, and the pushed images move the heads' old means; beside them the
    map of h (linear-h) carries RanPAC's sums."""
    argv = [*TINY, "--tasks", "2", "--epochs", "1", "--train-per-class", "2", "--classifier", "ncm"]
    run_script("treelora", [*argv, "--out", str(tmp_path / "plain")])
    run_script("treelora", [*argv, "--compare-heads", "ncm/adc,ridge0/adc-linear,ridge/adc,ridge/linear-h,align/ldc,"
                                               "ridge/linear-views,ncm/oracle-mean,align/ldc-mean,"
                                               "align/oracle-map,ridge/oracle-map",
                            "--rp-dim", "32",
                            "--out", str(tmp_path / "adc")])
    plain, adc = (json.loads((tmp_path / k / "results.json").read_text()) for k in ("plain", "adc"))
    assert adc["accuracy_matrix"] == plain["accuracy_matrix"]
    assert adc["heads"]["ncm/adc"]["accuracy_matrix"][0] == adc["accuracy_matrix"][0]  # task 1: nothing to move yet
    assert adc["heads"]["ridge0/adc-linear"]["accuracy_matrix"][1][0] is not None
    chosen = [t["compare_heads"]["ridge0/adc-linear"].get("map_ridge") for t in adc["tasks"]]
    assert chosen[0] is None and chosen[1] in classifier.CLASS_RIDGES  # the map's ε, from the second task on
    assert "map_ridge" not in adc["tasks"][1]["compare_heads"]["ncm/adc"]
    assert adc["tasks"][1]["compare_heads"]["ridge/linear-h"]["map_ridge"] in classifier.CLASS_RIDGES  # h's map
    c_plain, c_adc = (torch.load(tmp_path / k / continual.CHECKPOINT, weights_only=True) for k in ("plain", "adc"))
    assert all(torch.equal(c_plain["model"][k], v) for k, v in c_adc["model"].items())
    moved, stale = c_adc["compare_heads"]["ncm/adc"]["means"], c_adc["classifier"]["means"]
    assert moved.shape == stale.shape and not torch.equal(moved[:50], stale[:50])  # old classes moved
    assert torch.equal(moved[50:], stale[50:])  # the newest task's classes: taken under today's backbone
    rebuilt = c_adc["compare_heads"]["ridge/adc"]  # RanPAC's head keeps each class's Gaussian to rebuild G from
    assert rebuilt["factors"].shape == (100, *rebuilt["factors"].shape[1:]) and rebuilt["counts"].sum() == 200
    carried = c_adc["compare_heads"]["ridge/linear-h"]  # the map of h carries G itself: no Gaussian kept
    assert carried["factors"] is None and carried["G"].shape == (32, 32)
    ldc = c_adc["compare_heads"]["align/ldc"]  # LDC's projector, fitted on augmented views, moved the old classes
    assert not torch.equal(ldc["means"][:50], c_adc["compare_heads"]["ncm/oracle-mean"]["means"][:50])
    ldc_mean = c_adc["compare_heads"]["align/ldc-mean"]  # the same projector on the means alone (its own views)
    assert torch.equal(ldc_mean["means"], ldc["means"]) and not torch.equal(ldc_mean["factors"], ldc["factors"])
    assert adc["tasks"][1]["compare_heads"]["ridge/linear-views"]["map_ridge"] in classifier.CLASS_RIDGES
    oracle_map = c_adc["compare_heads"]["align/oracle-map"]  # the map of the old classes' own images moved them
    assert not torch.equal(oracle_map["means"][:50], stale[:50]) and torch.equal(oracle_map["means"][50:], stale[50:])
    assert c_adc["compare_heads"]["ridge/oracle-map"]["factors"] is not None  # through a projection: Gaussians rebuilt
    assert all(t["consolidate_seconds"] >= 0 for t in adc["tasks"])  # the views and the copy are not consolidation


def test_gaussian_gram_of_point_masses_is_the_direct_sum():
    """Zero covariance: every draw is its class's mean, so G and Q are the sums over counts[c] copies of h(mean_c)."""
    means = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([2.0, 5.0, 1.0])
    projection = continual.random_projection(0, 4, 6, torch.device("cpu"))
    h = project(means, projection)  # (3, M)
    for draws in (1, 3):  # several draws per image weigh as one image
        G, Q = gaussian_gram(means, torch.zeros(3, 4, 4), counts, projection, torch.Generator().manual_seed(1), draws)
        assert torch.allclose(G, h.T @ (counts[:, None].double() * h))
        assert torch.allclose(Q, h.T * counts.double())


def test_gaussian_gram_is_the_gaussians_second_moment():
    """No projection: G / n tends to mean mean^T + Sigma, the second moment of the class's Gaussian."""
    g = torch.Generator().manual_seed(0)
    feats, labels = blobs(1, 400, 3)
    means, factors = class_statistics(feats, labels, range(0, 1))
    G, Q = gaussian_gram(means, factors, torch.tensor([20000.0]), None, g)
    second = (means.T @ means + factors[0] @ factors[0].T).double()
    assert torch.allclose(G / 20000, second, atol=0.1 * second.abs().max())
    assert torch.allclose(Q[:, 0] / 20000, means[0].double(), atol=0.05)
    error = {draws: sum((gaussian_gram(means, factors, torch.tensor([50.0]), None, torch.Generator().manual_seed(s),
                                       draws)[0] / 50 - second).norm().item() for s in range(5)) for draws in (1, 100)}
    assert error[100] < error[1] / 3  # the draws' noise falls as 1 / sqrt(draws): 50 images' worth, 100 draws each


def test_the_gaussian_diagnostic_rebuilds_the_sums_and_moves_nothing():
    """--drift gaussian: old classes' G and Q come from their unmoved Gaussians (the exact sums are replaced, with
    as many images' worth as each class had); the means and covariances stay where the old task left them."""
    D, M = 6, 16
    feats, labels = blobs(4, 30, D, seed=4)
    projection = continual.random_projection(0, D, M, torch.device("cpu"))
    heads = {d: Classifier("ridge", nn.Linear(D, 4), d, projection=projection) for d in ("none", "gaussian")}
    for c in heads.values():
        c.end_task_(feats[:60], labels[:60], range(0, 2), torch.Generator().manual_seed(1))
    means, factors = heads["gaussian"].means.clone(), heads["gaussian"].factors.clone()
    for c in heads.values():
        c.end_task_(feats[60:] + 1.0, labels[60:], range(2, 4), torch.Generator().manual_seed(1), before=feats[60:])
    stale, rebuilt = heads["none"], heads["gaussian"]
    assert torch.equal(rebuilt.means[:2], means) and torch.equal(rebuilt.factors[:2], factors)
    assert not torch.allclose(rebuilt.G, stale.G)
    assert torch.allclose(rebuilt.Q.sum(0)[:2] / stale.Q.sum(0)[:2], torch.ones(2, dtype=torch.float64), atol=0.3)
    assert torch.allclose(rebuilt.Q[:, 2:], stale.Q[:, 2:])  # the new task's sums are exact in both


@pytest.mark.parametrize("drift", ["linear-cls", "adc-linear"])
def test_a_projected_ridge_head_follows_a_drift_by_its_regenerated_gaussians(drift):
    """RanPAC's head (M > 0) under a rotation of the features: rebuilt from the moved Gaussians it tells the old
    classes apart about as well as the oracle refitted on the rotated features, where the same head with stale sums
    does not; its state round-trips through a checkpoint."""
    g = torch.Generator().manual_seed(0)
    D, M = 6, 64
    feats, labels = blobs(4, 60, D, seed=3)
    A = torch.linalg.qr(torch.randn(D, D, generator=g))[0]  # the backbone's drift: a rotation
    projection = continual.random_projection(0, D, M, torch.device("cpu"))

    def probe(means):
        target = torch.arange(len(means)).repeat_interleave(20)
        pushed = means[target] + 0.3 * torch.randn(len(target), D, generator=g)
        return target, pushed, pushed @ A

    accuracy, heads = {}, {}
    for remedy in ("none", drift, "oracle"):
        c = Classifier("ridge", nn.Linear(D, 4), remedy, projection=projection)
        c.end_task_(feats[:120], labels[:120], range(0, 2), torch.Generator().manual_seed(1),
                    seen=[(feats[:120], labels[:120], range(0, 2))])
        c.end_task_(feats[120:] @ A, labels[120:], range(2, 4), torch.Generator().manual_seed(1), before=feats[120:],
                    probe=probe, seen=[(feats[:120] @ A, labels[:120], range(0, 2)),
                                       (feats[120:] @ A, labels[120:], range(2, 4))])
        accuracy[remedy] = (c.logits(feats[:120] @ A, 4).argmax(1) == labels[:120]).float().mean().item()
        heads[remedy] = c
    assert accuracy[drift] >= accuracy["oracle"] - 0.03 and accuracy["none"] < 0.5
    c = heads[drift]
    restored = Classifier("ridge", nn.Linear(D, 4), drift, projection=projection)
    restored.load_state_dict(c.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.stored_tensors(), c.stored_tensors()))
    assert len(c.stored_tensors()) == 5  # means, factors, counts, G and Q


@given(n=st.integers(2, 30), ridge=st.sampled_from([1e-4, 1e-2, 1.0]))
def test_the_drift_map_with_fewer_images_than_dimensions_is_the_dense_normal_equations(n, ridge):
    """linear_drift_map and carry solve n x n when n < D (the push-through identity); both equal the D x D
    normal equations A = I + (B^T B + eps I)^-1 B^T (a - b) with eps = ridge * tr(B^T B) / D."""
    g = torch.Generator().manual_seed(n)
    D = 12
    b = torch.randn(n, D, generator=g, dtype=torch.float64)
    a = b + 0.3 * b @ torch.randn(D, D, generator=g, dtype=torch.float64)
    eps = ridge * (b * b).sum() / D
    dense = torch.eye(D, dtype=torch.float64) + torch.linalg.solve(b.T @ b + eps * torch.eye(D, dtype=torch.float64),
                                                                   b.T @ (a - b))
    x = torch.randn(5, D, generator=g, dtype=torch.float64)
    assert torch.allclose(linear_drift_map(b, a, ridge), dense, atol=1e-9)
    assert torch.allclose(carry(x, b, a, ridge), x @ dense, atol=1e-9)


def test_the_head_space_map_is_the_feature_map_without_a_projection():
    """--drift linear-h with M = 0 fits the same map on the same inputs as linear-cls, and carries G and Q alike."""
    feats, labels = blobs(4, 30, 6, seed=5)
    drift = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(2)))[0]
    heads = {d: Classifier("ridge", nn.Linear(6, 4), d) for d in ("linear-cls", "linear-h")}
    for c in heads.values():
        c.end_task_(feats[:60], labels[:60], range(0, 2), torch.Generator().manual_seed(1))
        c.end_task_(feats[60:] @ drift, labels[60:], range(2, 4), torch.Generator().manual_seed(1), before=feats[60:])
    assert heads["linear-h"].map_ridge == heads["linear-cls"].map_ridge
    assert torch.allclose(heads["linear-h"].G, heads["linear-cls"].G) and torch.allclose(heads["linear-h"].Q,
                                                                                       heads["linear-cls"].Q)


def test_the_head_space_map_carries_a_projected_head_exactly_where_h_moves_linearly():
    """A positive scaling f -> 1.5 f moves h = ReLU(f W) to 1.5 h: with M > 0, linear-h's G and Q are the oracle's
    (refitted on the scaled features), where the stale head keeps the old ones. Positive features and W keep every
    unit of h active, so that the new task's images span every direction the old classes' h take."""
    D, M = 6, 16
    feats, labels = blobs(4, 80, D, seed=6)
    feats = feats.abs() + 0.5
    projection = continual.random_projection(0, D, M, torch.device("cpu")).abs()
    heads = {}
    for drift in ("none", "linear-h", "oracle"):
        c = Classifier("ridge", nn.Linear(D, 4), drift, projection=projection)
        c.end_task_(feats[:160], labels[:160], range(0, 2), torch.Generator().manual_seed(1),
                    seen=[(feats[:160], labels[:160], range(0, 2))])
        c.end_task_(1.5 * feats[160:], labels[160:], range(2, 4), torch.Generator().manual_seed(1),
                    before=feats[160:], seen=[(1.5 * feats[:160], labels[:160], range(0, 2)),
                                              (1.5 * feats[160:], labels[160:], range(2, 4))])
        heads[drift] = c
    oracle, moved, stale = heads["oracle"], heads["linear-h"], heads["none"]
    assert torch.allclose(moved.G, oracle.G, rtol=1e-3, atol=1e-3 * oracle.G.abs().max().item())
    assert torch.allclose(moved.Q, oracle.Q, rtol=1e-3, atol=1e-3 * oracle.Q.abs().max().item())
    assert not torch.allclose(stale.G, oracle.G, rtol=0.1)


def test_ldc_projector_stays_at_the_identity_without_drift_and_moves_toward_a_drift():
    """LDC's projector starts at the identity: where the views do not move it gets no gradient and stays there
    exactly; under a linear drift each epoch of Adam brings it closer to the drift's map (its fit error falls)."""
    g = torch.Generator().manual_seed(0)
    D = 6
    before = torch.randn(4, 50, D, generator=g)
    assert torch.equal(ldc_projector(before, before, torch.Generator().manual_seed(1)), torch.eye(D, dtype=torch.float64))
    A = torch.eye(D) + 0.3 * torch.randn(D, D, generator=g)
    errors = [(ldc_projector(before[:e], before[:e] @ A, torch.Generator().manual_seed(1), lr=0.05) - A).norm().item()
              for e in (1, 2, 4)]
    assert errors[0] < (torch.eye(D) - A).norm().item() and errors[2] < errors[1] < errors[0]


def test_the_map_on_views_is_linear_cls_fitted_on_the_images_and_their_views():
    """--drift linear-views: the held-out-class map of the task's images and every augmented view together, each
    view keeping its image's class, moves the old means as that map computed directly does."""
    feats, labels = blobs(4, 20, 5, seed=7)
    g = torch.Generator().manual_seed(3)
    A = torch.eye(5) + 0.2 * torch.randn(5, 5, generator=g)
    views_before = feats[40:] + 0.3 * torch.randn(3, 40, 5, generator=g)  # (E, N, D), in the images' order
    views_after = views_before @ A + 0.05 * torch.randn(3, 40, 5, generator=g)
    c = Classifier("ncm", nn.Linear(5, 4), "linear-views")
    c.end_task_(feats[:40], labels[:40], range(0, 2), g)
    old = c.means.clone()
    c.end_task_(feats[40:] @ A, labels[40:], range(2, 4), g, before=feats[40:], views=(views_before, views_after))
    b = torch.cat([feats[40:], views_before.flatten(0, 1)])
    a = torch.cat([feats[40:] @ A, views_after.flatten(0, 1)])
    ridge, _ = choose_map_ridge_by_class(b, a, labels[40:].repeat(4))
    assert c.map_ridge == ridge
    assert torch.allclose(c.means[:2], (old.double() @ linear_drift_map(b, a, ridge)).float(), atol=1e-5)


@pytest.mark.parametrize("kind", ["align", "ridge"])
def test_oracle_means_take_the_oracles_means_and_keep_the_stale_covariances(kind):
    """--drift oracle-mean: after a drift the old classes' means are the oracle's (their images under today's
    backbone) and their covariance factors the ones stored when their task ended; the ridge head rebuilds its sums
    from those Gaussians."""
    feats, labels = blobs(4, 30, 5, seed=8)
    A = torch.eye(5) + 0.5 * torch.randn(5, 5, generator=torch.Generator().manual_seed(4))
    projection = continual.random_projection(0, 5, 16, torch.device("cpu")) if kind == "ridge" else None
    heads = {}
    for drift in ("none", "oracle-mean"):
        c = Classifier(kind, nn.Linear(5, 4), drift, projection=projection)
        c.end_task_(feats[:60], labels[:60], range(0, 2), torch.Generator().manual_seed(1),
                    seen=[(feats[:60], labels[:60], range(0, 2))])
        stored = None if c.factors is None else c.factors.clone()
        c.end_task_(feats[60:] @ A, labels[60:], range(2, 4), torch.Generator().manual_seed(1),
                    seen=[(feats[:60] @ A, labels[:60], range(0, 2)), (feats[60:] @ A, labels[60:], range(2, 4))])
        heads[drift] = (c, stored)
    c, stored = heads["oracle-mean"]
    assert torch.allclose(c.means[:2], ncm_means(feats[:60] @ A, labels[:60], range(0, 2)))
    assert torch.equal(c.factors[:2], stored) and torch.equal(c.factors[2:], class_statistics(
        feats[60:] @ A, labels[60:], range(2, 4))[1])
    if kind == "ridge":  # the old classes' sums rebuilt from the moved means, the new task's exact
        assert not torch.allclose(c.G, heads["none"][0].G) and torch.allclose(c.Q[:, 2:], heads["none"][0].Q[:, 2:])


@pytest.mark.parametrize("kind", ["align", "ncm", "ridge0"])
def test_the_oracle_map_is_fitted_on_the_old_classes_own_images(kind):
    """--drift oracle-map: the map is fitted on the old classes' images before and after the task, not on the task's:
    where the old classes move by A and the task's images by another map B, the old statistics follow A (the oracle's
    means, up to the ridge toward the identity) and the map fitted on the task's images (linear) follows B."""
    feats, labels = blobs(4, 30, 5, seed=10)
    A, B = (torch.eye(5) + 0.5 * torch.randn(5, 5, generator=torch.Generator().manual_seed(s)) for s in (6, 7))
    old, new = feats[:60], feats[60:]
    seen = [(old @ A, labels[:60], range(0, 2)), (new @ B, labels[60:], range(2, 4))]
    heads = {}
    for drift in ("linear", "oracle-map"):
        c = Classifier(kind.removesuffix("0"), nn.Linear(5, 4), drift, lambdas=(1.0,))
        c.end_task_(old, labels[:60], range(0, 2), torch.Generator().manual_seed(1), seen=seen[:1])
        c.end_task_(new @ B, labels[60:], range(2, 4), torch.Generator().manual_seed(1), before=new, seen=seen,
                    seen_before=[old])
        heads[drift] = c
    assert heads["oracle-map"].needs_seen_before and not heads["oracle-map"].needs_features_before
    assert heads["oracle-map"].needs_seen_features and not heads["linear"].needs_seen_before
    if kind == "ridge0":  # no projection: G and Q are carried exactly by the fitted map
        m = (old @ A).double()
        assert torch.allclose(heads["oracle-map"].G, m.T @ m + (new @ B).double().T @ (new @ B).double(),
                              rtol=1e-3, atol=1e-3 * m.abs().max().item() ** 2)
        return
    oracle = ncm_means(old @ A, labels[:60], range(0, 2))
    assert torch.allclose(heads["oracle-map"].means[:2], oracle, atol=1e-3)
    assert torch.allclose(heads["linear"].means[:2], ncm_means(old @ B, labels[:60], range(0, 2)), atol=1e-3)
    assert not torch.allclose(heads["linear"].means[:2], oracle, atol=0.1)
    if kind == "align":  # the covariance carried through the fitted map: A^T (Sigma + ridge) A
        for k in range(2):
            carried = heads["oracle-map"].factors[k].double() @ heads["oracle-map"].factors[k].double().T
            sigma = torch.cov(old[labels[:60] == k].double().T)
            expected = A.double().T @ (sigma + 1e-4 * sigma.trace() / 5 * torch.eye(5, dtype=torch.float64)) @ A.double()
            assert torch.allclose(carried, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["align", "ridge"])
def test_a_map_on_the_means_alone_moves_the_means_as_the_map_does_and_keeps_the_stale_covariances(kind):
    """--drift linear-cls-mean: the old means are the full map's (linear-cls), their covariance factors the ones
    stored when their task ended (the stale head's); the ridge head rebuilds its sums from those Gaussians, where
    with a projection the full map rebuilds them from moved covariances."""
    feats, labels = blobs(4, 30, 5, seed=9)
    A = torch.eye(5) + 0.5 * torch.randn(5, 5, generator=torch.Generator().manual_seed(5))
    projection = continual.random_projection(0, 5, 16, torch.device("cpu")) if kind == "ridge" else None
    heads = {}
    for drift in ("none", "linear-cls", "linear-cls-mean"):
        c = Classifier(kind, nn.Linear(5, 4), drift, projection=projection)
        c.end_task_(feats[:60], labels[:60], range(0, 2), torch.Generator().manual_seed(1))
        stored = None if c.means is None else (c.means.clone(), c.factors.clone())
        c.end_task_(feats[60:] @ A, labels[60:], range(2, 4), torch.Generator().manual_seed(1), before=feats[60:])
        heads[drift] = (c, stored)
    (stale, _), (full, _), (means_only, (old_means, stored)) = heads.values()
    assert means_only.remedy == "linear-cls" and means_only.means_only and means_only.regenerates == (kind == "ridge")
    assert means_only.map_ridge == full.map_ridge is not None
    assert torch.equal(means_only.means, full.means) and not torch.allclose(means_only.means[:2], old_means)
    assert torch.equal(means_only.factors[:2], stored) and not torch.allclose(full.factors[:2], stored)
    assert torch.equal(means_only.factors[2:], full.factors[2:])  # the newest task's classes: taken today
    if kind == "ridge":  # rebuilt from moved means and stale covariances: neither the stale sums nor the full map's
        assert not torch.allclose(means_only.G, stale.G) and not torch.allclose(means_only.G, full.G)
    else:
        assert not torch.equal(means_only.weight, full.weight)
    assert classifier.head_problem("linear", "ldc-mean") and not classifier.head_problem("ncm", "adc-linear-mean")


def test_heads_whose_means_agree_share_one_adc_push(tmp_path, monkeypatch):
    """ADC's probe pushes images once per distinct set of old means and task: on the first drift every head's means
    are the stale ones, later ADC's moved means part from the map's, which a map's -mean shares; the nearest-mean
    head keeps means alone, so a map and its -mean are the same head there."""
    calls = []

    def counted(means, *args, **kwargs):
        calls.append(means.clone())
        return adversarial_pairs(means, *args, **{**kwargs, "per_class": 2})  # two images a class: fast

    monkeypatch.setattr(continual, "adversarial_pairs", counted)
    r = treelora.main([*TINY, "--tasks", "4", "--epochs", "1", "--train-per-class", "4", "--test-per-class", "2",
                       "--classifier", "ncm", "--out", str(tmp_path),
                       "--compare-heads", "ncm/adc,ncm/adc-linear,ncm/adc-linear-mean"])
    assert len(calls) == 5  # task 2: one push for all three heads; tasks 3 and 4: ADC's means and the map's
    assert not torch.equal(calls[1], calls[2])
    assert r["heads"]["ncm/adc-linear"]["accuracy_matrix"] == r["heads"]["ncm/adc-linear-mean"]["accuracy_matrix"]


def test_adc_views_is_linear_cls_fitted_on_the_images_their_views_and_the_pushed_images():
    """--drift adc-views: the held-out-class map of the task's images, every augmented view (in its image's class)
    and ADC's pushed images (each old class a class of its own) together moves the old means as that map computed
    directly does; the pushes go toward the head's old means."""
    feats, labels = blobs(4, 20, 5, seed=10)
    g = torch.Generator().manual_seed(6)
    A = torch.eye(5) + 0.2 * torch.randn(5, 5, generator=g)
    views_before = feats[40:] + 0.3 * torch.randn(2, 40, 5, generator=g)
    views_after = views_before @ A + 0.05 * torch.randn(2, 40, 5, generator=g)
    c = Classifier("align", nn.Linear(5, 4), "adc-views")
    c.end_task_(feats[:40], labels[:40], range(0, 2), g)
    old = c.means.clone()
    target = torch.tensor([0, 0, 1, 1, 1])
    pushed = old[target] + 0.1 * torch.randn(5, 5, generator=g)
    asked = []

    def probe(means):
        asked.append(means.clone())
        return target, pushed, pushed @ A

    c.end_task_(feats[40:] @ A, labels[40:], range(2, 4), g, before=feats[40:], probe=probe,
                views=(views_before, views_after))
    b = torch.cat([feats[40:], views_before.flatten(0, 1), pushed])
    a = torch.cat([feats[40:] @ A, views_after.flatten(0, 1), pushed @ A])
    ridge, _ = choose_map_ridge_by_class(b, a, torch.cat([labels[40:].repeat(3), target + 4]))
    assert len(asked) == 1 and torch.equal(asked[0], old) and c.map_ridge == ridge
    assert torch.allclose(c.means[:2], (old.double() @ linear_drift_map(b, a, ridge)).float(), atol=1e-5)
    assert c.needs_views and c.needs_backbone_before and c.needs_features_before


@pytest.mark.parametrize("n", [5, 12, 400])
def test_sldc_s_linear_map_is_the_ridge_solution_on_unit_features_shrunk_toward_the_identity(n):
    """SLDC's linear operator: taking the identity's share exp(-n / D) back out leaves a W at which the gradient of
    |X W - Y|^2 + gamma |W|^2 on the unit features vanishes; with many images against D and a drift that keeps lengths
    (a rotation) it is the drift itself."""
    D = 6
    g = torch.Generator().manual_seed(n)
    before = torch.randn(n, D, generator=g, dtype=torch.float64) * 3
    R = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    after = before @ R + (0.0 if n == 400 else 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64))
    M = classifier.sldc_linear_map(before, after)
    w = math.exp(-n / D)
    W = (M - w * torch.eye(D, dtype=torch.float64)) / (1 - w)
    x, y = torch.nn.functional.normalize(before, dim=1), torch.nn.functional.normalize(after, dim=1)
    assert (x.T @ (x @ W - y) + classifier.SLDC_GAMMA_1 * W).abs().max() < 1e-9
    if n == 400:
        assert torch.allclose(M, R, atol=1e-3)
    else:  # few images: the identity keeps its share
        assert torch.allclose(M, w * torch.eye(D, dtype=torch.float64) + (1 - w) * W)
        assert not torch.allclose(M, W, atol=0.05)


def test_an_sldc_linear_head_carries_its_statistics_through_the_map():
    feats, labels = blobs(4, 30, 5, seed=11)
    A = torch.eye(5) + 0.4 * torch.randn(5, 5, generator=torch.Generator().manual_seed(8))
    c = Classifier("align", nn.Linear(5, 4), "sldc-linear")
    c.end_task_(feats[:60], labels[:60], range(0, 2), torch.Generator().manual_seed(1))
    means, factors = c.means.clone(), c.factors.clone()
    c.end_task_(feats[60:] @ A, labels[60:], range(2, 4), torch.Generator().manual_seed(1), before=feats[60:])
    M = classifier.sldc_linear_map(feats[60:], feats[60:] @ A)
    assert torch.allclose(c.means[:2], (means.double() @ M).float(), atol=1e-5)
    assert torch.allclose(c.factors[:2], (M.T @ factors.double()).float(), atol=1e-5)
    assert classifier.head_problem("ridge", "sldc-linear-mean") is None


def test_weak_map_learns_a_drift_that_is_not_linear_and_keeps_lengths():
    """SLDC's weakly non-linear map: fitted on unit features before and after a drift with a ReLU part, it predicts
    held-out images' directions after the drift far better than no drift does; it maps a row's direction and scales
    the image by the row's length, so scaling a row scales its image; its mixture starts at softmax(1, 0, 0)."""
    g = torch.Generator().manual_seed(3)
    D = 12
    x = torch.randn(400, D, generator=g) + 1
    A, B = torch.eye(D) + 0.3 * torch.randn(D, D, generator=g), 0.5 * torch.randn(D, D, generator=g)
    y = x @ A + torch.relu(x @ B)
    m = classifier.weak_map(x[:300], y[:300], torch.Generator().manual_seed(0), steps=800)
    unit = torch.nn.functional.normalize
    with torch.no_grad():
        mapped_error = ((unit(m(unit(x[300:], dim=1)), dim=1) - unit(y[300:], dim=1)) ** 2).sum(1).mean()
        identity_error = ((unit(x[300:], dim=1) - unit(y[300:], dim=1)) ** 2).sum(1).mean()
        assert mapped_error < 0.2 * identity_error
        assert torch.allclose(m.move(3 * x[:5]), 3 * m.move(x[:5]), atol=1e-5)
    fresh = classifier.WeakMap(D, torch.Generator().manual_seed(0))
    assert torch.allclose(fresh.mixture(), torch.softmax(torch.tensor([1.0, 0.0, 0.0]), 0))
    # without its MLP (--drift sldc-no-mlp) the map is linear: x -> x (a_0 I + a_1 A), whatever the rows' lengths
    linear = classifier.weak_map(x[:300], y[:300], torch.Generator().manual_seed(0), steps=100, mlp=False)
    a = linear.mixture().detach()
    assert a[2] == 0 and a[0] != torch.softmax(torch.tensor([1.0, 0.0]), 0)[0]  # its mixture learns, unpenalised
    with torch.no_grad():
        assert torch.allclose(linear.move(x[:5]), x[:5] @ (a[0] * torch.eye(D) + a[1] * linear.A), atol=1e-4)


def test_move_gaussians_through_a_linear_map_is_the_exact_carry():
    """Moving a Gaussian by its draws (SLDC's way, for a map that is not linear) agrees with the exact carry
    mu -> mu A, Sigma -> A^T Sigma A when the map is linear, up to the draws' noise and the ridge."""
    g = torch.Generator().manual_seed(4)
    feats, labels = blobs(2, 50, 4, seed=11)
    means, factors = class_statistics(feats, labels, range(2))
    A = torch.eye(4) + 0.4 * torch.randn(4, 4, generator=g)
    moved, moved_factors = classifier.move_gaussians(means, factors, lambda f: f @ A, g, 40_000)
    assert torch.allclose(moved, means @ A, atol=0.05)
    exact = A.T @ factors @ factors.transpose(1, 2) @ A
    assert torch.allclose(moved_factors @ moved_factors.transpose(1, 2), exact, atol=0.1 * exact.abs().max().item())


def test_a_head_fits_sldc_s_map_as_the_loop_fits_it_once_for_every_head(monkeypatch):
    """--drift sldc: a head given the loop's shared map (fitted from a generator in the head's generator's state)
    ends as a head that fits the map itself; the old classes moved, the new ones stay as measured; the
    nearest-class-mean head moves its means as points."""
    monkeypatch.setattr(classifier, "SLDC_STEPS", 300)  # the map is the same either way: a short fit will do
    feats, labels = blobs(4, 20, 6, seed=12)
    g = torch.Generator().manual_seed(7)
    A = torch.eye(6) + 0.3 * torch.randn(6, 6, generator=g)
    after = feats[40:] @ A

    def run(kind: str, shared: bool, drift: str = "sldc") -> Classifier:
        torch.manual_seed(0)  # the same head rows in both
        c = Classifier(kind, nn.Linear(6, 4), drift, align_epochs=2)
        c.end_task_(feats[:40], labels[:40], range(0, 2), torch.Generator().manual_seed(1))
        weak = continual.shared_weak_map(feats[40:], after, torch.Generator().manual_seed(2)) if shared else None
        c.end_task_(after, labels[40:], range(2, 4), torch.Generator().manual_seed(2), before=feats[40:], weak=weak)
        return c

    own, shared = run("align", False), run("align", True)
    assert not torch.equal(run("align", True, "sldc-no-mlp").means, shared.means)  # the ablation's own fit
    assert torch.equal(own.means, shared.means) and torch.equal(own.factors, shared.factors)
    assert torch.equal(own.weight, shared.weight)
    stale, _ = class_statistics(feats, labels, range(4))
    assert not torch.allclose(own.means[:2], stale[:2], atol=0.1)  # the old classes moved
    assert torch.equal(own.means[2:], class_statistics(after, labels[40:], range(2, 4))[0])
    ncm = run("ncm", True)
    m = continual.shared_weak_map(feats[40:], after, torch.Generator().manual_seed(2))()
    assert torch.allclose(ncm.means[:2], m.move(ncm_means(feats[:40], labels[:40], range(2))), atol=1e-6)
    assert own.needs_features_before and not own.needs_views and Classifier("ridge", nn.Linear(6, 4), "sldc").regenerates


def test_sldc_heads_run_beside_a_run_and_move_only_the_old_classes(tmp_path, monkeypatch):
    """SLDC's heads in a run: the loop fits the weakly non-linear map once a task for all of them (counted), the
    heads move their old classes' Gaussians by its draws and keep the newest task's as measured, and the ridge head
    rebuilds its sums from them even without a projection, where a linear map would carry its sums exactly."""
    monkeypatch.setattr(classifier, "SLDC_STEPS", 50)
    fits = []

    def counted(*args, **kwargs):
        fits.append(1)
        return classifier.weak_map(*args, **kwargs)

    monkeypatch.setattr(continual, "weak_map", counted)
    r = treelora.main([*TINY, "--tasks", "4", "--epochs", "1", "--train-per-class", "2", "--test-per-class", "2",
                       "--classifier", "ncm", "--rp-dim", "16", "--out", str(tmp_path),
                       "--compare-heads", "align/sldc,ridge0/sldc,ridge/sldc,align,align/sldc-no-mlp"])
    assert len(fits) == 6  # tasks 2 to 4, one fit each for the three heads of sldc and one for sldc-no-mlp
    mixtures = [t.get("sldc_mixture") for t in r["tasks"]]
    assert mixtures[0] is None and all(len(w["sldc"]) == 3 and sum(w["sldc"]) == pytest.approx(1, abs=1e-3)
                                       for w in mixtures[1:])
    assert r["heads"]["align/sldc"]["accuracy_matrix"][0] == r["heads"]["align"]["accuracy_matrix"][0]
    c = torch.load(tmp_path / continual.CHECKPOINT, weights_only=True)["compare_heads"]
    moved, stale = c["align/sldc"], c["align"]
    assert not torch.equal(moved["means"][:75], stale["means"][:75])  # tasks 1 to 3's classes moved
    assert torch.equal(moved["means"][75:], stale["means"][75:])  # the newest task's, taken under today's backbone
    assert c["ridge0/sldc"]["factors"] is not None and c["ridge0/sldc"]["counts"].sum() == 200


def test_a_run_with_remedies_beside_it_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Every remedy's statistics are checkpointed with the run: interrupted during the second task and resumed, a run
    keeping LDC (its views drawn from a generator), SLDC's two maps (one fitted from a generator) and the best linear
    map beside its head ends with the uninterrupted run's accuracies and, to the bit, its heads' statistics, which the
    remedies moved after the resume."""
    monkeypatch.setattr(classifier, "SLDC_STEPS", 50)  # a short fit: what is checked is that it resumes
    heads = "align/ldc,ridge/sldc,align/sldc-linear,align/oracle-map,align/oracle"  # ADC's push: its own test
    argv = [*TINY, "--tasks", "2", "--epochs", "1", "--train-per-class", "2", "--classifier", "ncm",
            "--rp-dim", "32", "--draws", "1", "--compare-heads", heads]
    reference = treelora.main([*argv, "--out", str(tmp_path / "reference")])
    restore = interrupt_evaluation(monkeypatch, at=2)  # the first task's statistics checkpointed, not yet moved
    with pytest.raises(continual.Interrupted):
        treelora.main([*argv, "--out", str(tmp_path / "killed")])
    restore()
    resumed = treelora.main([*argv, "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed["heads"] == reference["heads"] and resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert resumed["drift_recovery"] == reference["drift_recovery"]
    a, b = (torch.load(tmp_path / k / continual.CHECKPOINT, weights_only=True) for k in ("killed", "reference"))
    for name, state in b["compare_heads"].items():
        for k, v in state.items():
            assert (torch.equal(v, a["compare_heads"][name][k]) if torch.is_tensor(v)
                    else v == a["compare_heads"][name][k]), (name, k)
