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
          highest cosine to the feature;
  ridge   RanPAC's head (McDonnell et al. NeurIPS 2023, arXiv 2307.02251): a fixed Gaussian projection W (D x M),
          h = ReLU(f W), the Gram matrix G = sum h^T h and Q = sum h^T y (one-hot) accumulated task by task, and
          the logits h (G + lambda I)^-1 Q over every seen class; M = 0 is the plain ridge head on f.

A class's statistics are taken once, with the backbone at the end of the class's task, and never refreshed:
the methods keep no old data to refresh them with. `drift` says what happens to them when the backbone moves:

  none    nothing (the default);
  sdc     old class means move by the drift of the new task's images near them (SDC; means only: align, ncm);
  linear  a linear map A fitted by least squares from the new task's features before the task to the same
          images' features after it carries every stored statistic: mu -> mu A, Sigma -> A^T Sigma A,
          G -> A^T G A, Q -> A^T Q (exact for second-order statistics; a ReLU projection's G does not transform,
          so it serves align, ncm and ridge with M = 0);
  linear-cv  the same map, its ridge toward the identity chosen by the error on held-out images of the task;
  linear-cls  the same map, its ridge chosen by how well the drift of one of the task's classes is predicted from the
          task's other classes: the map is applied to classes it never saw, and this is the error it makes on one;
  adc     adversarial drift compensation (ADC, Goswami et al. CVPR 2024, arXiv 2405.19074): for each old class, the
          task's images nearest its mean are pushed by a few gradient steps until the backbone before the task gives
          them features near that mean; the mean moves by how far the backbone after the task moves those images
          (means only: align, ncm);
  adc-linear  the linear map fitted on the task's images and ADC's pushed images together (with linear-cls's
          ridge): the pushed images are evidence about where every old class lies, the map carries every statistic;
  linear-h  the ridge head's own map: linear-cls's map fitted on its inputs h = ReLU(f W) before and after the task
          (M x M, from fewer images than M through the push-through identity), which carries G -> B^T G B and
          Q -> B^T Q exactly, with no Gaussian to draw (ridge only; with M = 0 it is linear-cls);
  ldc     learnable drift compensation (LDC, Gomez-Villa et al. ECCV 2024, arXiv 2407.08536): a bias-free linear
          projector trained by Adam on the mean squared error between the task's augmented images' features before
          the task, projected, and the same views' features after it; it carries every statistic as the map does;
  linear-views  linear-cls's map fitted in closed form on the same augmented views as ldc (LDC's data, our solve);
  adc-views  linear-cls's map fitted on the task's images, their augmented views and ADC's pushed images together:
          both kinds of evidence at once (ours);
  sldc    SLDC's weakly non-linear map (Rao et al. AAAI 2026, arXiv 2511.09926): identity, a linear map and an MLP
          mixed by learned weights, fitted by Adam on the task's unit features before and after the task; each old
          class's Gaussian moves by draws through it (align, ridge; ncm moves its means as points); sldc-no-mlp is
          the same map without its MLP branch, a linear map (the ablation);
  sldc-linear  SLDC's linear operator: a ridge least-squares map of the task's unit features (ridge 1e-4 toward 0),
          shrunk toward the identity by exp(-n / D) for n images in D dimensions; it carries every statistic as the
          map does;
  gaussian  a diagnostic of the ridge head alone: nothing moves, but after each task old classes' sums are rebuilt
          from their Gaussians as a remedy would rebuild them; what the rebuild costs where there is no drift;
  oracle  a diagnostic, never a default: the statistics of every seen class are recomputed from all its
          training images under the current backbone. It uses old data, which no method keeps; the gap to it
          is what stale statistics cost;
  oracle-mean  a diagnostic: old classes' means recomputed as the oracle's, their covariances (and the ridge head's
          Gaussians) left stale; with the oracle, it splits what stale statistics cost into the means' part and the
          covariances' part;
  oracle-map  a diagnostic: the linear map fitted, as linear's, on the old classes' own training images before and
          after the task carries every statistic: the best any single linear map of the features could do, so that
          what a map fitted on the task's images loses splits into what its evidence costs and what being one linear
          map costs;
  <map>-mean  any map above (linear, linear-cv, linear-cls, adc-linear, ldc, linear-views, adc-views, sldc-linear)
          moving the means only, the covariances left stale: oracle-mean's remedy counterpart, for backbones whose
          covariances a map carries worse than it leaves them (docs/results.md).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

CLASSIFIERS = ("linear", "align", "ncm", "ridge")
# remedies that carry every statistic
MAPS = ("linear", "linear-cv", "linear-cls", "adc-linear", "ldc", "linear-views", "adc-views", "sldc-linear")
MEAN_MAPS = tuple(f"{m}-mean" for m in MAPS)  # the same maps moving the means only (deviation 42)
# what moves old statistics when the backbone changes
DRIFT = ("none", "sdc", "linear", "linear-cv", "linear-cls", "linear-h", "adc", "adc-linear", "ldc", "linear-views",
         "adc-views", "sldc", "sldc-no-mlp", "sldc-linear", "gaussian", "oracle", "oracle-mean", "oracle-map", *MEAN_MAPS)
ALIGN_SAMPLES = 256  # features sampled per class and epoch, SLCA's num_sampled_pcls
ALIGN_EPOCHS = 20  # SLCA uses 5 (ca_epochs) on 100 classes; with 10 classes 20 measured better (docs/deviations.md, deviation 24)
ALIGN_LR = 0.01  # SGD, momentum 0.9, cosine-annealed over the epochs (SLCA)
# reconstructed: a ridge of 1e-4 times the mean variance keeps a covariance from fewer images than dimensions
# positive definite, scale-free (docs/deviations.md, deviation 25).
RIDGE = 1e-4
RIDGE_LAMBDAS = tuple(10.0 ** k for k in range(-8, 9))  # RanPAC's grid for the ridge head's lambda
# draws per image when the ridge head rebuilds old sums from Gaussians (gaussian_gram): one draw's noise cost up to
# 4.5 points on the domain regime, ten none (docs/results.md, deviation 39)
DRAWS = 10
FIT_SHARE = 0.8  # RanPAC: lambda is fitted on 80 % of the task's features and scored on the other 20 %
MAP_RIDGES = tuple(RIDGE * 10.0 ** k for k in range(9))  # linear-cv: the linear map's ridge is chosen from these
CLASS_RIDGES = tuple(RIDGE * 10.0 ** (k / 2) for k in range(17))  # linear-cls, adc-linear: the same range, finer
# reconstructed: ADC pushes 100 images per class (its sample_limit); our tasks have 300 to 600 (deviation 38)
ADC_SAMPLES = 32
ADC_STEPS = 3  # ADC's adv_epoch: gradient steps per pushed image
# reconstructed: ADC steps alpha = 25 along the gradient of a batch of 100 CIFAR images normalised over the batch, about
# 0.045 per input element (root mean square); we normalise per image at that size, so that one pass can push images
# toward many classes at any resolution (docs/deviations.md, deviation 38).
ADC_STEP = 25 / (100 * 3 * 32 * 32) ** 0.5
# LDC trains its projector for 20 epochs of the task's augmented training batches (128 images), Adam at 1e-3; an
# epoch is one fresh view of every image, so 20 views per image hold the same data
LDC_VIEWS, LDC_BATCH, LDC_LR = 20, 128, 1e-3
# SLDC's weakly non-linear map (its official code): Adam for 5000 steps of 32 random pairs, its rate cosine-annealed
# from 1e-3 to 5e-4; gamma_2 = 0.5 weighs the pull of its mixture toward the identity and the linear branch; each old
# class is moved as 10 D draws from its Gaussian (deviation 44)
SLDC_STEPS, SLDC_BATCH, SLDC_LR, SLDC_LR_MIN, SLDC_GAMMA, SLDC_DRAWS = 5000, 32, 1e-3, 5e-4, 0.5, 10
# SLDC's linear operator (its official code's defaults): the ridge gamma_1 on unit features and alpha_t, the scale of
# the shrinkage toward the identity, exp(-n / (alpha_t D)) for n images in D dimensions
SLDC_GAMMA_1, SLDC_ALPHA_T = 1e-4, 1.0


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


def copy_generator(gen: torch.Generator) -> torch.Generator:
    """A generator in gen's state that leaves gen where it is: a remedy's own draws, so that a head's draws stay the
    stale head's."""
    return torch.Generator(gen.device).set_state(gen.get_state())


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
    # reconstructed: s^2 is the images' mean squared distance to their own class mean (docs/deviations.md, deviation 27).
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


def ncm_means(features: Tensor, labels: Tensor, classes: range) -> Tensor:
    """Each class's mean feature (c, D), float32 (as class_statistics computes it, without the covariance)."""
    return torch.stack([features[labels == k].double().mean(0).float() for k in classes])


def project(features: Tensor, projection: Tensor | None) -> Tensor:
    """The ridge head's input: h = ReLU(f W) for a projection W (D, M); f itself (float64) when W is None."""
    f = features.double()
    return f if projection is None else torch.relu(f @ projection.double())


def one_hot(labels: Tensor, classes: range) -> Tensor:
    """(N, C) float64 targets over classes 0..classes.stop-1 (every class seen so far)."""
    return F.one_hot(labels, classes.stop).double()


def ridge_logits(features: Tensor, projection: Tensor | None, weight: Tensor) -> Tensor:
    """The ridge head's float32 logits: ReLU(f W) Wo, or f Wo without a projection; weight Wo is (M, C)."""
    f = features.float()
    return (f if projection is None else torch.relu(f @ projection)) @ weight


def ridge_solve(G: Tensor, Q: Tensor, lam: float) -> Tensor:
    """(G + lam I)^-1 Q, float64: the ridge head's weights (M, C) from its Gram matrix and targets."""
    eye = torch.eye(len(G), dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + lam * eye, Q)


def choose_lambda(h: Tensor, y: Tensor, lambdas: tuple[float, ...], gen: torch.Generator) -> tuple[float, list[float]]:
    """RanPAC's rule for lambda: fit the ridge head on 80 % of one task's (h, y) rows, score the mean squared error
    of its outputs on the other 20 %, and take the grid's lowest (the smallest lambda on a tie).

    h: (N, M) float64 inputs of the head, y: (N, C) one-hot. Returns lambda and every grid point's error. All
    lambdas come from one eigendecomposition: in the dual, K = H H^T (n x n), when there are fewer fitting rows
    n than M (h_v H^T (K + lam I)^-1 Y equals the primal h_v (H^T H + lam I)^-1 H^T Y), else of G = H^T H.
    """
    # reconstructed: the 80/20 split is of a seeded permutation of the task's rows; RanPAC's loader is shuffled
    # too, but our features come class by class (docs/deviations.md, deviation 29).
    order = torch.randperm(len(h), generator=gen, device=gen.device).to(h.device)
    n = int(len(h) * FIT_SHARE)
    fit, val = order[:n], order[n:]
    H, Y, Hv, Yv = h[fit], y[fit], h[val], y[val]
    if n < H.shape[1]:  # dual: P(lam) = (Hv H^T U) diag(1 / (e + lam)) (U^T Y)
        e, U = torch.linalg.eigh(H @ H.T)
        left, right = Hv @ H.T @ U, U.T @ Y
    else:  # primal: P(lam) = (Hv V) diag(1 / (e + lam)) (V^T H^T Y)
        e, V = torch.linalg.eigh(H.T @ H)
        left, right = Hv @ V, V.T @ (H.T @ Y)
    e = e.clamp_min(0)  # a Gram matrix is positive semi-definite; rounding can leave tiny negatives
    errors = [((left / (e + lam)) @ right - Yv).pow(2).mean().item() for lam in lambdas]
    return lambdas[min(range(len(lambdas)), key=errors.__getitem__)], errors


def linear_drift_map(before: Tensor, after: Tensor, ridge: float = RIDGE) -> Tensor:
    """A (D, D) minimising |before A - after|^2 + eps |A - I|^2: the linear map that carries features before a task to
    the same images' features after it (SLDC's transition operator, arXiv 2511.09926), rows as features.

    A = I + (B^T B + eps I)^-1 B^T (after - B): the drift is fitted, and directions the task's images do not span
    keep no drift instead of collapsing to 0.
    """
    # reconstructed: the ridge toward the identity, eps = 1e-4 times the mean squared feature, keeps the normal
    # equations well posed when the task's images span fewer directions than D (docs/deviations.md, deviation 30).
    b, a = before.double(), after.double()
    coefficients, pushed = _drift_coefficients(b, a, ridge)
    return torch.eye(b.shape[1], dtype=b.dtype, device=b.device) + (b.T @ coefficients if pushed else coefficients)


def _drift_coefficients(b: Tensor, a: Tensor, ridge: float) -> tuple[Tensor, bool]:
    """(B^T B + eps I)^-1 B^T (a - b), the fitted drift A - I (D, D), or with fewer images n than dimensions D its
    n x n form (B B^T + eps I)^-1 (a - b) (the push-through identity: A - I = B^T times it), and which one."""
    n, D = b.shape
    eps = ridge * ((b * b).sum() / D + 1e-12)  # ridge times the mean squared feature, tr(B^T B) / D
    if n < D:  # the D x D solve costs D^3: in the ridge head's projected space (D = M = 2000) n x n is far cheaper
        return torch.linalg.solve(b @ b.T + eps * torch.eye(n, dtype=b.dtype, device=b.device), a - b), True
    gram = b.T @ b
    return torch.linalg.solve(gram + eps * torch.eye(D, dtype=b.dtype, device=b.device), b.T @ (a - b)), False


def carry(x: Tensor, before: Tensor, after: Tensor, ridge: float = RIDGE) -> Tensor:
    """x A for the linear_drift_map A fitted on (before, after), without forming A when the fit has fewer images
    than dimensions: x + (x B^T) (B B^T + eps I)^-1 (a - b)."""
    b, a, x = before.double(), after.double(), x.double()
    coefficients, pushed = _drift_coefficients(b, a, ridge)
    return x + ((x @ b.T) @ coefficients if pushed else x @ coefficients)


def choose_map_ridge(before: Tensor, after: Tensor, ridges: tuple[float, ...] = MAP_RIDGES) -> tuple[float, list[float]]:
    """--drift linear-cv: the linear map's ridge (times the mean squared feature) that predicts the drift of held-out
    images best: fitted on a seeded 80 % of the task's images, scored by the mean squared error of the other 20 %'s
    features after the task. Large ridges tend to the identity (no drift), so the choice can fall back to it.
    Returns the ridge and every candidate's error."""
    # reconstructed: the 80/20 split of RanPAC's lambda rule, applied to the map's ridge (docs/deviations.md, deviation 30).
    order = torch.randperm(len(before), generator=torch.Generator().manual_seed(0)).to(before.device)
    n = int(len(before) * FIT_SHARE)
    fit, val = order[:n], order[n:]
    b, a = before.double(), after.double()
    errors = [((carry(b[val], b[fit], a[fit], r) - a[val]) ** 2).mean().item() for r in ridges]
    return ridges[min(range(len(ridges)), key=errors.__getitem__)], errors


def choose_map_ridge_by_class(before: Tensor, after: Tensor, labels: Tensor,
                              ridges: tuple[float, ...] = CLASS_RIDGES) -> tuple[float, list[float]]:
    """--drift linear-cls: the linear map's ridge that predicts best the drift of a class the map was not fitted on:
    for each class, the map is fitted on the other classes' images and scored by the mean squared error of the
    class's features after the task; errors are summed over the classes. Returns the ridge and every candidate's
    error (the first candidate, the smallest ridge, with fewer than two classes)."""
    # reconstructed: leave-one-class-out choice of the ridge (docs/deviations.md, deviation 30).
    b, a = before.double(), after.double()
    classes = labels.unique()
    if len(classes) < 2:
        return ridges[0], []
    errors = [sum(((carry(b[labels == k], b[labels != k], a[labels != k], r) - a[labels == k]) ** 2)
                  .mean().item() for k in classes) for r in ridges]
    return ridges[min(range(len(ridges)), key=errors.__getitem__)], errors


def ldc_projector(before: Tensor, after: Tensor, gen: torch.Generator, *, batch: int = LDC_BATCH,
                  lr: float = LDC_LR) -> Tensor:
    """LDC's forward projector P (D, D), features as rows: f -> f P (Gomez-Villa et al. ECCV 2024, arXiv 2407.08536).

    before, after: (E, N, D), epoch e's augmented view of each of the task's N images under the backbone before and
    after the task. Each epoch takes its views in a fresh order, `batch` at a time, one Adam step each on the mean
    squared error between before P and after; bias-free, as LDC's nn.Linear. Returns P, float64.
    """
    # reconstructed: LDC's projector starts at PyTorch's random initialisation; ours starts at the identity (no
    # drift): our tasks give it 60 steps (300 images, 20 epochs of 128), too few to leave a random map
    # (docs/deviations.md, deviation 41).
    E, N, D = before.shape
    P = nn.Parameter(torch.eye(D, device=before.device))
    opt = torch.optim.Adam([P], lr=lr)
    with torch.enable_grad():
        for e in range(E):
            order = torch.randperm(N, generator=gen, device=gen.device).to(before.device)
            for s in range(0, N, batch):
                i = order[s:s + batch]
                loss = F.mse_loss(before[e, i].float() @ P, after[e, i].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    if not torch.isfinite(P).all():
        raise FloatingPointError("LDC's projector is not finite")
    return P.detach().double()


class WeakMap(nn.Module):
    """SLDC's weakly non-linear transition operator (Rao et al. AAAI 2026, arXiv 2511.09926), on unit features:
    x -> a_0 x + a_1 x A + a_2 MLP(x), (a_0, a_1, a_2) = softmax(alphas), A starting at the identity and the MLP
    (D -> D -> D, ReLU, with biases) at PyTorch's initialisation; alphas start at (1, 0, 0), so the map starts near the
    identity and learns how far to leave it. Rows as features. mlp=False is the ablation without the MLP branch
    (a_2 = 0, --drift sldc-no-mlp): the same draws from gen, a map that is linear."""

    def __init__(self, D: int, gen: torch.Generator, mlp: bool = True):
        super().__init__()
        bound = D ** -0.5  # nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from gen

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=gen, device=gen.device) * 2 - 1) * bound)

        self.alphas = nn.Parameter(torch.tensor([1.0, 0.0, 0.0], device=gen.device))
        self.A = nn.Parameter(torch.eye(D, device=gen.device))
        self.W1, self.b1, self.W2, self.b2 = uniform(D, D), uniform(D), uniform(D, D), uniform(D)
        self.mlp = mlp

    def mixture(self) -> Tensor:
        if not self.mlp:
            return F.pad(torch.softmax(self.alphas[:2], 0), (0, 1))
        return torch.softmax(self.alphas, 0)

    def forward(self, x: Tensor) -> Tensor:
        a = self.mixture()
        y = a[0] * x + a[1] * (x @ self.A)
        return y + a[2] * (F.relu(x @ self.W1 + self.b1) @ self.W2 + self.b2) if self.mlp else y

    def move(self, x: Tensor) -> Tensor:
        """The map as SLDC applies it to features of any length: each row's direction is mapped and the image
        scaled by the row's length."""
        norm = x.norm(dim=1, keepdim=True)
        return self(x / norm.clamp_min(1e-12)) * norm


def sldc_linear_map(before: Tensor, after: Tensor, gamma: float = SLDC_GAMMA_1, alpha_t: float = SLDC_ALPHA_T) -> Tensor:
    """SLDC's linear transition operator (Rao et al. AAAI 2026, arXiv 2511.09926), (D, D), features as rows: the ridge
    least-squares map W = (X^T X + gamma I)^-1 X^T Y from the task's features before the task (X) to after it (Y),
    both scaled to unit length, then shrunk toward the identity by the weight w = exp(-n / (alpha_t D)) of n images in
    D dimensions: (1 - w) W + w I. Few images against D leave most of the weight on the identity."""
    x, y = F.normalize(before.double(), dim=1), F.normalize(after.double(), dim=1)
    n, D = x.shape
    eye = torch.eye(D, dtype=x.dtype, device=x.device)
    w = math.exp(-n / (alpha_t * D))
    return (1 - w) * torch.linalg.solve(x.T @ x + gamma * eye, x.T @ y) + w * eye


def weak_map(before: Tensor, after: Tensor, gen: torch.Generator, *, steps: int | None = None,
             batch: int = SLDC_BATCH, lr: float = SLDC_LR, lr_min: float = SLDC_LR_MIN,
             gamma: float = SLDC_GAMMA, mlp: bool = True) -> WeakMap:
    """--drift sldc: SLDC's weakly non-linear map fitted from the task's features before it to the same images'
    features after it, both scaled to unit length: Adam on the mean squared error of `batch` pairs drawn with
    replacement at each step, plus gamma (a_0 + a_1 - 1)^2, which keeps the mixture's weight off the MLP unless the
    MLP earns it; the rate is cosine-annealed from lr to lr_min over the steps (SLDC_STEPS unless given). Returns
    the map, in eval mode."""
    # reconstructed: SLDC's official code computes the gamma term into its logged total but back-propagates the mean
    # squared error alone; we back-propagate the total the code names (docs/deviations.md, deviation 44).
    steps = SLDC_STEPS if steps is None else steps
    b, a = F.normalize(before.float(), dim=1), F.normalize(after.float(), dim=1)
    m = WeakMap(b.shape[1], gen, mlp)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr_min)
    with torch.enable_grad():
        for _ in range(steps):
            i = torch.randint(len(b), (batch,), generator=gen, device=gen.device).to(b.device)
            w = m.mixture()
            loss = F.mse_loss(m(b[i]), a[i]) + gamma * (w[0] + w[1] - 1) ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    if not all(torch.isfinite(p).all() for p in m.parameters()):
        raise FloatingPointError("SLDC's weakly non-linear map is not finite")
    return m.eval()


@torch.no_grad()
def move_gaussians(means: Tensor, factors: Tensor, fn: Callable[[Tensor], Tensor], gen: torch.Generator,
                   draws: int, ridge: float = RIDGE) -> tuple[Tensor, Tensor]:
    """Each class's Gaussian carried through a map of the features that is not linear (SLDC's way): `draws` draws
    from N(mu_c, L_c L_c^T) go through fn, and the class becomes their mean and the Cholesky factor of their
    covariance, ridged as class_statistics ridges it. Returns means (C, D) and factors (C, D, D), float32."""
    one_class = torch.zeros(draws, dtype=torch.long, device=means.device)
    moved = [class_statistics(fn(sample_features(means[c:c + 1], factors[c:c + 1], draws, gen)[0]), one_class,
                              range(1), ridge) for c in range(len(means))]
    return torch.cat([mu for mu, _ in moved]), torch.cat([L for _, L in moved])


def gaussian_gram(means: Tensor, factors: Tensor, counts: Tensor, projection: Tensor | None,
                  gen: torch.Generator, draws: int = 1) -> tuple[Tensor, Tensor]:
    """The ridge head's sums G = sum h^T h and Q = sum h^T y over old classes, regenerated from their Gaussians.

    Class c contributes counts[c] images' worth of draws f ~ N(means[c], L_c L_c^T) (factors[c] = L_c), each
    through h = project(f): draws * counts[c] of them, weighted 1 / draws. A map of the features moves a Gaussian
    exactly but not G through a ReLU projection: the ridge head keeps each class's Gaussian and rebuilds G and Q
    from it after a remedy has moved it. Returns G (M, M) and Q (M, C), float64.
    """
    G = Q = None
    for c in range(len(means)):  # a class at a time: classes may differ in their counts
        f, _ = sample_features(means[c:c + 1], factors[c:c + 1], int(counts[c]) * draws, gen)
        h = project(f, projection)
        col = torch.zeros(len(means), dtype=torch.float64, device=h.device)
        col[c] = 1
        g, q = h.T @ h / draws, h.sum(0)[:, None] * col[None, :] / draws
        G, Q = (g, q) if G is None else (G + g, Q + q)
    return G, Q


def adversarial_pairs(means: Tensor, images: Tensor, prepare: Callable[[Tensor], Tensor], before: Tensor,
                      old_features: Callable[[Tensor], Tensor], new_features: Callable[[Tensor], Tensor], *,
                      per_class: int = ADC_SAMPLES, steps: int = ADC_STEPS, step: float = ADC_STEP,
                      chunk: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """ADC's evidence about where old classes went (Goswami et al. CVPR 2024, Alg. 1).

    means: (C, D) old classes' means in the space of the backbone before the task; images: (N, ...) the task's
    training images as stored (uint8) and prepare: a batch of them -> the model's input; before: (N, D) their
    features before the task; old_features, new_features: the backbone before and after the task, model input ->
    (B, D) float32. For each class, its per_class nearest images (by `before`) take `steps` steps of `step` per input
    element (root mean square) down the gradient of |old_features(x) - mean|^2, kept within the valid images' range;
    those that the nearest-mean rule of the old space then gives to the class are kept. Returns their classes (K,),
    old features (K, D) and new features (K, D), float32.
    """
    C, k = len(means), min(per_class, len(images))
    nearest = torch.cdist(means.float(), before.float()).topk(k, dim=1, largest=False).indices.flatten()  # (C k,)
    target = torch.arange(C, device=means.device).repeat_interleave(k)
    lo, hi = prepare(torch.zeros_like(images[:1])), prepare(torch.full_like(images[:1], 255))  # the pixel range
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    kept_target, kept_old, kept_new = [], [], []
    for s in range(0, len(nearest), chunk):  # images are pushed independently: a chunk at a time bounds memory
        x, y = prepare(images[nearest[s:s + chunk]]), target[s:s + chunk]
        size = step * x[0].numel() ** 0.5
        for _ in range(steps):
            x.requires_grad_(True)
            with torch.enable_grad():
                grad, = torch.autograd.grad((old_features(x) - means[y].float()).pow(2).sum(), x)
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
            x = torch.maximum(torch.minimum(x.detach() - size * grad / norm, hi), lo)
        old = old_features(x).detach().float()
        kept = torch.cdist(old.double(), means.double()).argmin(1) == y
        kept_target.append(y[kept])
        kept_old.append(old[kept])
        kept_new.append(new_features(x[kept]).detach().float() if kept.any() else old[kept])
    return torch.cat(kept_target), torch.cat(kept_old), torch.cat(kept_new)


def adversarial_means(means: Tensor, target: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """ADC's moved means: each class with kept pushed images moves by their mean drift new - old; others stay."""
    drift = torch.zeros_like(means, dtype=torch.float64).index_add_(0, target, (new - old).double())
    count = torch.zeros(len(means), dtype=torch.float64, device=means.device).index_add_(
        0, target, torch.ones_like(target, dtype=torch.float64))
    return (means.double() + drift / count.clamp_min(1)[:, None]).float()


# ----------------------------------------------------------------------------------------------------------
# The head's state across tasks


class Classifier:
    """The statistics a head keeps (ncm: means; align: means and covariance factors; ridge: G and Q) and the step
    that rewrites the head after each task.

    The run's head writes into the model's head (`head`), whose rows the masked cross-entropy trains. A head
    kept beside it for comparison (`own=True`) works on its own copy of the rows and changes nothing in the run.
    """

    def __init__(self, kind: str, head: nn.Linear, drift: str = "none", *, own: bool = False,
                 projection: Tensor | None = None, lambdas: tuple[float, ...] = RIDGE_LAMBDAS, draws: int = DRAWS,
                 align_epochs: int = ALIGN_EPOCHS):
        problem = head_problem(kind, drift)
        if problem:
            raise ValueError(problem)
        if kind == "ridge" and not lambdas:
            raise ValueError("the ridge head needs at least one lambda")
        self.kind, self.head, self.drift, self.own = kind, head, drift, own
        if draws < 1:
            raise ValueError("draws must be at least 1")
        if align_epochs < 1:
            raise ValueError("the aligned head needs at least one epoch")
        self.projection, self.lambdas, self.draws, self.align_epochs = projection, tuple(lambdas), draws, align_epochs
        self.weight = head.weight.detach().clone() if own else head.weight.data  # (classes, D)
        self.bias = head.bias.detach().clone() if own else head.bias.data
        self.means: Tensor | None = None  # (C, D), classes in the order of the head's rows
        self.factors: Tensor | None = None  # (C, D, D), align, and ridge with a Gaussian-regenerated G
        self.counts: Tensor | None = None  # (C,) images per class, ridge with a Gaussian-regenerated G
        self.G: Tensor | None = None  # (M, M) float64, ridge only: sum of h^T h over every seen image
        self.Q: Tensor | None = None  # (M, C) float64, ridge only: sum of h^T y
        self.ridge_weight: Tensor | None = None  # (M, C) float32: (G + lambda I)^-1 Q
        self.lam: float | None = None  # the last task's lambda
        self.map_ridge: float | None = None  # linear-cv: the last task's ridge of the linear map
        # the map's name and whether it moves the means only (a <map>-mean drift) or every statistic
        self.remedy = drift.removesuffix("-mean") if drift in MEAN_MAPS else drift
        self.means_only = drift in MEAN_MAPS

    @property
    def needs_features(self) -> bool:
        return self.kind != "linear"

    @property
    def regenerates(self) -> bool:
        """Whether the ridge head rebuilds old classes' G and Q from their Gaussians after a remedy moved them
        (gaussian_gram): when only means move (sdc, adc), or a map meets a ReLU projection, which G cannot follow,
        or a map moves the means alone (a map's -mean), or a map is not linear (sldc), or as a diagnostic with nothing
        moved (gaussian) or only the means (oracle-mean). The plain ridge head (M = 0) under a full linear map
        carries G exactly instead."""
        moves_gaussians = ("sdc", "adc", "sldc", "sldc-no-mlp", "gaussian", "oracle-mean")
        return self.kind == "ridge" and (self.drift in moves_gaussians or self.means_only or (
            self.drift in (*MAPS, "oracle-map") and self.projection is not None))

    @property
    def needs_features_before(self) -> bool:
        """Whether end_task_ wants the task's features under the backbone before the task as well."""
        return self.needs_features and self.remedy not in ("none", "gaussian", "oracle", "oracle-mean", "oracle-map",
                                                           "ldc")

    @property
    def needs_views(self) -> bool:
        """Whether end_task_ wants LDC_VIEWS augmented views of the task's images under the backbone before and
        after the task (ldc, linear-views, adc-views)."""
        return self.needs_features and self.remedy in ("ldc", "linear-views", "adc-views")

    @property
    def needs_backbone_before(self) -> bool:
        """Whether end_task_ wants a probe of the backbone before the task (ADC pushes images through it)."""
        return self.needs_features and self.remedy in ("adc", "adc-linear", "adc-views")

    @property
    def needs_seen_features(self) -> bool:
        """Whether end_task_ wants every seen task's features under the current backbone (the oracle)."""
        return self.needs_features and self.drift in ("oracle", "oracle-mean", "oracle-map")

    @property
    def needs_seen_before(self) -> bool:
        """Whether end_task_ wants every old task's features under the backbone before the task (oracle-map)."""
        return self.needs_features and self.drift == "oracle-map"

    def _add(self, features: Tensor, labels: Tensor, classes: range) -> Tensor | None:
        """Append the statistics of one task's classes; the ridge head returns its input h for these features."""
        if self.kind == "ridge":
            h = project(features, self.projection)
            G, Q = h.T @ h, h.T @ one_hot(labels, classes)  # (M, M), (M, C)
            self.G = G if self.G is None else self.G + G
            self.Q = Q if self.Q is None else F.pad(self.Q, (0, Q.shape[1] - self.Q.shape[1])) + Q  # new columns
            if self.regenerates:  # each class's Gaussian, which a remedy moves and G is rebuilt from
                means, factors = class_statistics(features, labels, classes)
                counts = torch.bincount(labels - classes.start, minlength=len(classes)).to(torch.float64)
                self.factors = factors if self.factors is None else torch.cat([self.factors, factors])
                self.counts = counts if self.counts is None else torch.cat([self.counts, counts])
            elif self.needs_backbone_before:  # ADC pushes images toward the classes' means
                means = ncm_means(features, labels, classes)
            else:
                return h
            self.means = means if self.means is None else torch.cat([self.means, means])
            return h
        if self.kind == "ncm":
            means, factors = ncm_means(features, labels, classes), None
        else:
            means, factors = class_statistics(features, labels, classes)
            self.factors = factors if self.factors is None else torch.cat([self.factors, factors])
        self.means = means if self.means is None else torch.cat([self.means, means])
        return None

    def _transform(self, A: Tensor) -> None:
        """Carry the stored statistics through the linear map f -> f A (features as rows); a <map>-mean drift
        carries the means alone."""
        if self.means_only:
            self.means = (self.means.double() @ A).float()
            return
        if self.kind == "ridge" and not self.regenerates:
            self.G, self.Q = A.T @ self.G @ A, A.T @ self.Q
        if self.means is not None:
            self.means = (self.means.double() @ A).float()
        if self.factors is not None:  # Sigma = L L^T -> A^T Sigma A = (A^T L)(A^T L)^T: A^T L is a square root
            self.factors = (A.T @ self.factors.double()).float()

    @torch.no_grad()
    def end_task_(self, features: Tensor, labels: Tensor, classes: range, gen: torch.Generator,
                  before: Tensor | None = None, seen: list[tuple[Tensor, Tensor, range]] | None = None,
                  probe: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None,
                  views: tuple[Tensor, Tensor] | None = None, weak: Callable[[str], WeakMap] | None = None,
                  seen_before: list[Tensor] | None = None) -> None:
        """Add the task's classes' statistics (features: (N, D) of the task's training images, labels global) and
        rewrite the head's rows of every seen class.

        before: the same images' features under the backbone before the task (every remedy); seen: (features,
        labels, classes) of every seen task under the current backbone, this one included and last (oracle,
        oracle-mean, oracle-map); seen_before: every old task's features (seen's but the last) under the backbone
        before the task (oracle-map);
        probe: old classes' means -> ADC's pushed images' (classes, features before, features after)
        (adversarial_pairs with the task's images and both backbones; adc, adc-linear, adc-views); views: (E, N, D)
        features of E augmented views of the task's images (in the order of `labels`) before and after the task
        (ldc, linear-views, adc-views); weak: the drift (sldc, sldc-no-mlp) -> SLDC's map fitted on (before,
        features) from a generator in gen's state (the loop fits each once for every head of a run), else fitted
        here.
        """
        if self.kind == "linear":
            return
        if self.own:  # the new classes' rows as the masked cross-entropy trained them (align starts from them)
            self.weight[classes.start:classes.stop] = self.head.weight[classes.start:classes.stop]
            self.bias[classes.start:classes.stop] = self.head.bias[classes.start:classes.stop]
        old = self.G is not None or self.means is not None
        if self.drift == "oracle":
            self.means = self.factors = self.counts = self.G = self.Q = None
            for f, y, c in seen:
                h = self._add(f, y, c)  # the last is this task's
        else:
            if old and self.drift == "sdc":
                self.means = compensate_drift(self.means, before, features, labels)
            if old and self.remedy == "linear":
                self._transform(linear_drift_map(before, features))
            if old and self.remedy == "linear-cv":
                self.map_ridge, _ = choose_map_ridge(before, features)
                self._transform(linear_drift_map(before, features, self.map_ridge))
            if old and self.remedy == "linear-cls":
                self.map_ridge, _ = choose_map_ridge_by_class(before, features, labels)
                self._transform(linear_drift_map(before, features, self.map_ridge))
            if old and self.remedy == "sldc-linear":
                self._transform(sldc_linear_map(before, features))
            if old and self.drift == "linear-h":  # the map of the head's inputs: G and Q follow it exactly
                h_before, h_after = project(before, self.projection), project(features, self.projection)
                self.map_ridge, _ = choose_map_ridge_by_class(h_before, h_after, labels)
                B = linear_drift_map(h_before, h_after, self.map_ridge)
                self.G, self.Q = B.T @ self.G @ B, B.T @ self.Q
            if old and self.drift == "adc":
                self.means = adversarial_means(self.means, *probe(self.means))
            if old and self.remedy == "ldc":  # its shuffles from a copy of gen: the head's own draws stay the stale head's
                self._transform(ldc_projector(*views, copy_generator(gen)))
            if old and self.remedy in ("adc-linear", "linear-views", "adc-views"):  # linear-cls's map on more evidence
                b, a, y = [before], [features], [labels]
                if self.remedy != "adc-linear":  # every augmented view, counted in its image's class
                    b, a = [*b, views[0].flatten(0, 1)], [*a, views[1].flatten(0, 1)]
                    y = [*y, labels.repeat(len(views[0]))]
                if self.remedy != "linear-views":  # ADC's pushed images, each old class a class of its own in the choice
                    target, pushed_before, pushed_after = probe(self.means)
                    b, a, y = [*b, pushed_before], [*a, pushed_after], [*y, target + classes.stop]
                b, a, y = torch.cat(b), torch.cat(a), torch.cat(y)
                self.map_ridge, _ = choose_map_ridge_by_class(b, a, y)
                self._transform(linear_drift_map(b, a, self.map_ridge))
            if old and self.drift in ("sldc", "sldc-no-mlp"):  # a map that is not linear moves Gaussians by their draws
                m = (weak(self.drift) if weak is not None else
                     weak_map(before, features, copy_generator(gen), mlp=self.drift == "sldc"))
                if self.factors is None:  # the nearest-class-mean head keeps means only: they are moved as points
                    self.means = m.move(self.means.float())
                else:
                    self.means, self.factors = move_gaussians(self.means, self.factors, m.move, copy_generator(gen),
                                                              SLDC_DRAWS * self.means.shape[1])
            if old and self.drift == "oracle-map":  # the least-squares map of the old classes' own images
                self._transform(linear_drift_map(torch.cat(seen_before), torch.cat([f for f, _, _ in seen[:-1]])))
            if old and self.drift == "oracle-mean":  # the oracle's means, the stored covariances
                self.means = torch.cat([ncm_means(f, y, c) for f, y, c in seen[:-1]])
            if old and self.regenerates:
                self.G, self.Q = gaussian_gram(self.means, self.factors, self.counts, self.projection, gen,
                                               self.draws)
            h = self._add(features, labels, classes)
        if self.kind == "ncm":
            ncm_head_(self.weight, self.bias, self.means)
        elif self.kind == "align":
            align_head_(self.weight, self.bias, self.means, self.factors, gen, epochs=self.align_epochs)
        else:
            self.lam, _ = choose_lambda(h, one_hot(labels, classes), self.lambdas, gen)
            self.ridge_weight = ridge_solve(self.G, self.Q, self.lam).float()
            if not torch.isfinite(self.ridge_weight).all():
                raise FloatingPointError("the ridge head is not finite")

    def logits(self, features: Tensor, seen_classes: int) -> Tensor:
        """float32 logits (B, seen_classes) of features (B, D), over every seen class."""
        if self.kind == "ridge":
            return ridge_logits(features, self.projection, self.ridge_weight[:, :seen_classes])
        return F.linear(features.float(), self.weight[:seen_classes].float(), self.bias[:seen_classes].float())

    def stored_tensors(self) -> list[Tensor]:
        """What the head keeps between tasks: means (and covariance factors), or G and Q."""
        return [t for t in (self.means, self.factors, self.counts, self.G, self.Q) if t is not None]

    def state_dict(self) -> dict:
        state = {"means": self.means, "factors": self.factors, "counts": self.counts, "G": self.G, "Q": self.Q,
                 "ridge_weight": self.ridge_weight, "lam": self.lam}
        if self.own:
            state.update(weight=self.weight, bias=self.bias)
        return state

    def load_state_dict(self, state: dict) -> None:
        device = self.weight.device
        for key in ("means", "factors", "counts", "G", "Q", "ridge_weight"):
            value = state.get(key)  # counts: absent from checkpoints written before the ridge head kept Gaussians
            setattr(self, key, None if value is None else value.to(device))
        self.lam = state["lam"]
        if self.own:
            self.weight.copy_(state["weight"])
            self.bias.copy_(state["bias"])


class RidgeHead(nn.Module):
    """The ridge head as a module, for a deployed model: logits = ReLU(f W) Wo (or f Wo without a projection)."""

    def __init__(self, projection: Tensor | None, weight: Tensor):
        super().__init__()
        self.register_buffer("projection", projection)
        self.register_buffer("weight", weight)  # (M, C)

    def forward(self, features: Tensor) -> Tensor:
        return ridge_logits(features, self.projection, self.weight)


def head_problem(kind: str, drift: str) -> str | None:
    """Why a head and a drift treatment do not go together, as one sentence, or None."""
    if kind not in CLASSIFIERS or drift not in DRIFT:
        return f"the head {kind!r} with drift {drift!r} is not one of {CLASSIFIERS} with one of {DRIFT}"
    if kind == "linear" and drift != "none":
        return f"the linear head (the masked head as trained) keeps no class statistics for {drift} to move"
    if drift == "linear-h" and kind != "ridge":
        return f"--drift linear-h maps the ridge head's inputs h = ReLU(f W), which the {kind} head does not have"
    if drift == "gaussian" and kind != "ridge":
        return f"--drift gaussian is a diagnostic of the ridge head's rebuilt sums, which the {kind} head does not keep"
    return None
