"""The head of a class-incremental learner, treated the same way whatever the method does to the backbone.

While a task trains, the masked cross-entropy sees only that task's logits, so old classes are never set against
new ones and, after each task, old images are called the newest task's classes. After each task (after the
method's own consolidation) the loop hands this module the class-token features of the task's training images,
computed by the backbone as it now is, and `--classifier` says what becomes of the head:

  linear  the head as the masked cross-entropy left it (the ablation);
  align   classifier alignment (SLCA, Zhang et al. ICCV 2023, arXiv 2303.05118; HiDe-Prompt/HiDeLoRA): each new
          class keeps the mean and covariance of its features, and the head's rows of every seen class are
          retrained on features sampled from the classes' Gaussians;
  ncm     nearest class mean (SimpleCIL, Zhou et al. arXiv 2303.07338; Janson et al. arXiv 2210.04428): each
          class's row becomes its unit mean feature and its bias 0, so argmax of the logits is the class of
          highest cosine to the feature.

A class's statistics are taken once, with the backbone at the end of the class's task, and never refreshed:
the methods keep no old data to refresh them with.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

CLASSIFIERS = ("linear", "align", "ncm")
DRIFT = ("none", "sdc")  # what moves old class means when the backbone changes: nothing, or SDC
ALIGN_SAMPLES = 256  # features sampled per class and epoch, SLCA's num_sampled_pcls
ALIGN_EPOCHS = 20  # SLCA uses 5 (ca_epochs) on 100 classes; with 10 classes 20 measured better (README)
ALIGN_LR = 0.01  # SGD, momentum 0.9, cosine-annealed over the epochs (SLCA)
# reconstructed: a ridge of 1e-4 times the mean variance keeps a covariance from fewer images than dimensions
# positive definite, scale-free (README, deviation 25).
RIDGE = 1e-4


# ----------------------------------------------------------------------------------------------------------
# Pure functions on tensors


def class_statistics(features: Tensor, labels: Tensor, classes: range, ridge: float = RIDGE) -> tuple[Tensor, Tensor]:
    """Each class's mean feature and the Cholesky factor L of its covariance (Sigma + ridge * tr(Sigma)/D * I).

    features: (N, D); labels: (N,) global class indices, each of `classes` present at least once.
    Returns means (c, D) and factors (c, D, D), lower-triangular, L L^T = the ridged covariance, float32.
    """
    means, factors = [], []
    for k in classes:
        f = features[labels == k].double()  # (n_k, D)
        mu = f.mean(0)
        centred = f - mu
        cov = centred.T @ centred / max(len(f) - 1, 1)  # (D, D), the unbiased estimate (torch.cov's)
        cov = cov + ridge * (cov.trace() / len(mu) + 1e-12) * torch.eye(len(mu), dtype=cov.dtype, device=cov.device)
        means.append(mu.float())
        factors.append(torch.linalg.cholesky(cov).float())
    return torch.stack(means), torch.stack(factors)


def sample_features(means: Tensor, factors: Tensor, per_class: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """per_class draws from each class's Gaussian N(mu_c, L_c L_c^T): x = mu_c + L_c z, z ~ N(0, I).

    Returns features (C * per_class, D) and their class indices (C * per_class,), class-major.
    """
    C, D = means.shape
    z = torch.randn(C, per_class, D, generator=gen, device=means.device)  # (C, n, D)
    x = means[:, None, :] + z @ factors.transpose(1, 2)  # (C, n, D): row-vector form of mu + L z
    return x.reshape(C * per_class, D), torch.arange(C, device=means.device).repeat_interleave(per_class)


def align_head_(weight: Tensor, bias: Tensor, means: Tensor, factors: Tensor, gen: torch.Generator, *,
                epochs: int = ALIGN_EPOCHS, per_class: int = ALIGN_SAMPLES, lr: float = ALIGN_LR) -> None:
    """Retrain the head's first C rows (every seen class) on features sampled from the classes' Gaussians.

    weight (>= C, D) and bias (>= C,) are edited in place from their current values; each epoch draws fresh
    samples, shuffles them and takes steps of per_class samples with the cross-entropy over the C classes.
    """
    C = len(means)
    w, b = nn.Parameter(weight[:C].detach().clone().float()), nn.Parameter(bias[:C].detach().clone().float())
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    with torch.enable_grad():
        for _ in range(epochs):
            x, y = sample_features(means, factors, per_class, gen)
            order = torch.randperm(len(y), generator=gen, device=y.device)
            for s in range(0, len(y), per_class):
                i = order[s:s + per_class]
                loss = F.cross_entropy(F.linear(x[i], w, b), y[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise FloatingPointError("the aligned head is not finite")
    weight[:C] = w.detach().to(weight.dtype)
    bias[:C] = b.detach().to(bias.dtype)


def compensate_drift(means: Tensor, before: Tensor, after: Tensor, labels: Tensor) -> Tensor:
    """Old class means moved by the drift the backbone's last task caused (SDC, Yu et al. CVPR 2020, eq. 5-6).

    before, after: (N, D) features of the task's training images under the backbone before and after the task;
    labels: (N,) their classes. Each mean moves by the kernel-weighted mean drift of the images near it,
    w_i = exp(-|z_i - mu|^2 / (2 s^2)), normalised over the images.
    """
    # reconstructed: s^2 is the images' mean squared distance to their own class mean (README, deviation 27).
    before, drift = before.double(), (after - before).double()  # (N, D)
    centred = before.clone()
    for k in labels.unique():
        centred[labels == k] -= before[labels == k].mean(0)
    s2 = centred.pow(2).sum(1).mean()
    w = torch.softmax(-torch.cdist(means.double(), before).pow(2) / (2 * s2), dim=1)  # (C, N)
    return means + (w @ drift).float()


def ncm_head_(weight: Tensor, bias: Tensor, means: Tensor) -> None:
    """Rows 0..C-1 become the unit class means and their biases 0: w_c . f = |f| cos(f, mu_c)."""
    C = len(means)
    weight[:C] = F.normalize(means.float(), dim=1).to(weight.dtype)
    bias[:C] = 0


# ----------------------------------------------------------------------------------------------------------
# The head's state across tasks


class Classifier:
    """The statistics kept for `kind` (means for ncm; means and covariance factors for align) and the step that
    rewrites the head after each task."""

    def __init__(self, kind: str, head: nn.Linear, drift: str = "none"):
        if kind not in CLASSIFIERS or drift not in DRIFT:
            raise ValueError(f"classifier {kind!r} / drift {drift!r} is not one of {CLASSIFIERS} / {DRIFT}")
        self.kind, self.head, self.drift = kind, head, drift
        self.means: Tensor | None = None  # (C, D), classes in the order of the head's rows
        self.factors: Tensor | None = None  # (C, D, D), align only

    @property
    def needs_features(self) -> bool:
        return self.kind != "linear"

    @property
    def needs_features_before(self) -> bool:
        """Whether end_task_ wants the task's features under the backbone before the task as well (SDC)."""
        return self.needs_features and self.drift == "sdc"

    @torch.no_grad()
    def end_task_(self, features: Tensor, labels: Tensor, classes: range, gen: torch.Generator,
                  before: Tensor | None = None) -> None:
        """Add the task's classes' statistics (features: (N, D) of the task's training images, labels global)
        and rewrite the head's rows of every seen class; with SDC, first move the old means by the drift from
        `before` (the same images' features under the backbone before the task) to `features`."""
        if self.kind == "linear":
            return
        if self.drift == "sdc" and self.means is not None:
            self.means = compensate_drift(self.means, before, features, labels)
        if self.kind == "ncm":  # the means alone (as class_statistics computes them), no covariance
            means = torch.stack([features[labels == k].double().mean(0).float() for k in classes])
            self.means = means if self.means is None else torch.cat([self.means, means])
            ncm_head_(self.head.weight, self.head.bias, self.means)
            return
        means, factors = class_statistics(features, labels, classes)
        self.means = means if self.means is None else torch.cat([self.means, means])
        self.factors = factors if self.factors is None else torch.cat([self.factors, factors])
        align_head_(self.head.weight, self.head.bias, self.means, self.factors, gen)

    def stored_tensors(self) -> list[Tensor]:
        return [t for t in (self.means, self.factors) if t is not None]

    def state_dict(self) -> dict:
        return {"means": self.means, "factors": self.factors}

    def load_state_dict(self, state: dict) -> None:
        device = self.head.weight.device
        self.means, self.factors = (None if state[k] is None else state[k].to(device) for k in ("means", "factors"))
