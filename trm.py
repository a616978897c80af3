"""TRM: Trajectory Regularized Merging, continual merging without storing past models or data.

Paper: https://arxiv.org/abs/2605.08311 (only the abstract is public). Everything below beyond the abstract's
three objectives is a RECONSTRUCTION (docs/deviations.md, deviations 18-23).

The method in five lines:
  1. Keep only the frozen backbone W0 and one merged delta M per LoRA layer between tasks.
  2. Task t trains a fresh LoRA on W0 + M_{t-1}, saving K snapshots D_1..D_K of its delta (its trajectory).
  3. The merge searches M(c) = M_{t-1} + sum_k c_k D_k + c_h M_{t-1}, per-layer coefficients c, from the plain
     sequential merge c_init (c_K = 1, others 0).
  4. Adam on c minimises task alignment + prediction consistency on the old classes + a gradient-
     responsiveness hinge (the features' Fisher trace must not collapse) + a trust region, on task t's data.
  5. The snapshots are freed; M_t = M(c*) is all that is kept.

Run:  python trm.py --tasks 10                 (--merge-steps 0 is the plain sequential merge)
      python trm.py --dataset synthetic --tasks 10 --epochs 2 --batch-size 64      (CPU, offline)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from continual import Method, TaskBatches, UserError, main_guard, run_continual, step_begin
from flags import CLArgs, arg, parse_args
from lora_vit import ViT, lora_layers, lora_parameters


@dataclass
class Args(CLArgs):
    """TRM's flags on top of the shared protocol."""

    # reconstructed: every default below is ours; the paper's values are not public (deviation 21).

    snapshots: int = arg(0, "snapshots K of the task's LoRA delta, evenly spread over its epochs (0: one per epoch)")
    merge_steps: int = arg(20, "Adam steps S on the merge coefficients; 0 is the plain sequential merge (a step "
                               "costs about two training steps: 20 keep the merge under a fifth of a task's training "
                               "at the default 20 epochs)")
    merge_lr: float = arg(0.05, "Adam learning rate of the merge coefficients")
    lam_pc: float = arg(1.0, "weight of prediction consistency on the old classes")
    lam_gr: float = arg(1.0, "weight of the gradient-responsiveness hinge")
    rho: float = arg(0.5, "the merged model's feature Fisher trace tr Cov(f) must stay >= rho times the previous "
                          "model's")
    mu: float = arg(0.1, "trust-region weight mu |c - c_init|^2")
    temperature: float = arg(2.0, "distillation temperature T of the two KL terms")

    def problem(self) -> str | None:
        if self.snapshots < 0 or self.snapshots > self.epochs:
            return f"--snapshots must be between 0 (one per epoch) and --epochs ({self.epochs})."
        if self.merge_steps < 0:
            return "--merge-steps must be at least 0; 0 is the plain sequential merge."
        for name in ("merge_lr", "temperature"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                return f"--{name.replace('_', '-')} must be a positive number."
        for name in ("lam_pc", "lam_gr", "rho", "mu"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                return f"--{name.replace('_', '-')} must be a non-negative number."
        return super().problem()


# ----------------------------------------------------------------------------------------------------------
# The augmented trajectory subspace


# reconstructed: the subspace, snapshots plus the previous merged delta, and its coefficients (deviation 20).
def trajectory_merge(prev: Tensor, directions: Tensor, c: Tensor) -> Tensor:
    """M(c) = M_prev + sum_k c_k D_k + c_h M_prev for one layer.

    prev: (d, k) the merged delta M_{t-1}; directions: (K, d, k) the snapshots D_1..D_K; c: (K + 1,) holds
    c_1..c_K then c_h. At c_init = (0, ..., 0, 1, 0) every zero term adds exactly nothing, so the result is
    bit-for-bit prev + D_K, the plain sequential merge.
    """
    K = directions.shape[0]
    return prev + torch.tensordot(c[:K], directions, dims=1) + c[K] * prev


def initial_coefficients(layers: int, snapshots: int, device: torch.device | None = None) -> Tensor:
    """c_init, (layers, K + 1): c_K = 1 and every other coefficient 0 (the plain sequential merge)."""
    c = torch.zeros(layers, snapshots + 1, device=device)
    c[:, snapshots - 1] = 1.0
    return c


def snapshot_epochs(epochs: int, snapshots: int) -> list[int]:
    """The K epochs (0-based) after which a snapshot is taken, evenly spread, always including the last."""
    # reconstructed: one snapshot per epoch by default; fewer are spread evenly (docs/deviations.md, deviation 19).
    return sorted({round((k + 1) * epochs / snapshots) - 1 for k in range(snapshots)})


# ----------------------------------------------------------------------------------------------------------
# The three objectives and the trust region (all on logits; T is the distillation temperature)
# reconstructed: the abstract names the three objectives; these formulas are ours (docs/deviations.md, deviation 21).


def distill_kl(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def task_alignment(merged: Tensor, endpoint: Tensor, y: Tensor, temperature: float) -> Tensor:
    """CE on the task's labels + T^2 KL(fine-tuned endpoint || merged), both on the task's classes' logits."""
    return F.cross_entropy(merged, y) + distill_kl(endpoint, merged, temperature)


def prediction_consistency(merged_old: Tensor, previous_old: Tensor, temperature: float) -> Tensor:
    """T^2 KL(previous merged model || merged) on the old classes' logits; 0 when there are no old classes."""
    if merged_old.shape[-1] == 0:
        return merged_old.new_zeros(())
    return distill_kl(previous_old, merged_old, temperature)


# reconstructed: responsiveness measured on the features the next task's head will train on (deviation 21).
def feature_fisher_trace(features: Tensor) -> Tensor:
    """tr Cov(f) over the batch, (B, D) -> scalar: the Fisher information a fresh linear head with a bias gets from
    the features under a Gaussian likelihood. Collapsed features (every input alike) give 0: no signal to learn."""
    return (features - features.mean(0)).pow(2).sum(1).mean()


def gradient_responsiveness(merged: Tensor, previous: Tensor, rho: float) -> Tensor:
    """Hinge max(0, rho * F(previous) - F(merged)) on the feature Fisher trace: 0 while the merged model keeps
    rho of the previous one's, positive once a merge collapses the features (a rigid start for the next task)."""
    return F.relu(rho * feature_fisher_trace(previous).detach() - feature_fisher_trace(merged))


def trust_region(c: Tensor, c_init: Tensor) -> Tensor:
    return ((c - c_init) ** 2).sum()


# ----------------------------------------------------------------------------------------------------------


def merge_objective(c: Tensor, *, w0: Sequence[Tensor], prev: Sequence[Tensor], directions: Sequence[Tensor],
                    features_of: Callable[[list[Tensor], Tensor], Tensor], head: tuple[Tensor, Tensor], x: Tensor,
                    y: Tensor, classes: range, endpoint: Tensor, previous: Tensor, previous_features: Tensor,
                    temperature: float, rho: float, lam_pc: float, lam_gr: float, mu: float,
                    c_init: Tensor) -> dict[str, Tensor]:
    """TRM's merge objective at coefficients c (layers, K + 1) on one batch: its terms and their weighted total.

    w0, prev, directions: per layer W0, M_{t-1} and the stacked snapshots (K, d, k). features_of(weights, x)
    gives the class-token features (B, D) with each layer's base weight replaced by weights[l]; head: the
    seen classes' rows (weight, bias). endpoint, previous: the fine-tuned endpoint's and the previous merged
    model's logits on x; previous_features: the previous merged model's features (all without gradient).
    """
    weights = [w + trajectory_merge(m, d, cl) for w, m, d, cl in zip(w0, prev, directions, c)]
    features = features_of(weights, x)  # (B, D)
    merged = F.linear(features, *head).float()  # (B, seen classes)
    lo, hi = classes.start, classes.stop
    terms = {
        "alignment": task_alignment(merged[:, lo:hi], endpoint[:, lo:hi], y, temperature),
        "consistency": prediction_consistency(merged[:, :lo], previous[:, :lo], temperature),
        "responsiveness": gradient_responsiveness(features.float(), previous_features.float(), rho),
        "trust": trust_region(c, c_init),
    }
    terms["total"] = (terms["alignment"] + lam_pc * terms["consistency"] + lam_gr * terms["responsiveness"]
                      + mu * terms["trust"])
    with torch.no_grad():  # a measure, not a term: how often the merged model's old-class prediction is the previous
        # model's on this batch (no old data is kept, so old tasks' accuracy itself cannot be measured here)
        terms["old_predictions_kept"] = ((merged[:, :lo].argmax(1) == previous[:, :lo].argmax(1)).float().mean()
                                         if lo else torch.ones((), device=merged.device))
    return terms


# ----------------------------------------------------------------------------------------------------------
# Wiring into the loop


class FeatureView(nn.Module):
    """The model's class-token features as a module's forward, for functional_call."""

    def __init__(self, model: ViT):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


# reconstructed: state W0 + M, a fresh LoRA per task, snapshots, Adam on c over the task's batches (dev. 19-22).
class TRM(Method):
    """Trajectory Regularized Merging: snapshots during the task, then the merge of merge_objective()."""

    def __init__(self, model: ViT, *, snapshot_at: Sequence[int], merge_steps: int, merge_lr: float, lam_pc: float,
                 lam_gr: float, rho: float, mu: float, temperature: float):
        self.model = model
        self.layers = lora_layers(model)
        self.features = FeatureView(model)
        self.names = [f"model.{n}.base.weight" for n, m in model.named_modules() if m in self.layers]
        self.w0 = [layer.base.weight.detach().clone() for layer in self.layers]
        self.merged = [torch.zeros_like(w) for w in self.w0]  # M_{t-1} per layer: all that is kept
        self.snapshot_at = set(snapshot_at)
        self.merge_steps = merge_steps
        self.merge_lr = merge_lr
        self.weights = dict(lam_pc=lam_pc, lam_gr=lam_gr, mu=mu, rho=rho, temperature=temperature)
        self.trajectory: list[list[Tensor]] = []  # per snapshot, per layer: the delta D_k (freed after the merge)
        self.trained: list[nn.Parameter] = []
        self.first_grad_norm: Tensor | None = None

    def begin_task(self, task: int, batches: TaskBatches) -> list[nn.Parameter]:
        for layer in self.layers:
            layer.reset_adapter_()  # a fresh LoRA on W0 + M_{t-1}
        self.trajectory, self.first_grad_norm = [], None
        self.trained = [*lora_parameters(self.layers), *self.model.head.parameters()]
        return self.trained

    def after_backward(self) -> None:
        if self.first_grad_norm is None:  # the first step of the task: is the merged model still trainable?
            # Over every trained parameter: the new task's head rows start at zero, so at this first step no
            # gradient reaches the LoRA factors yet; the head's gradient carries the merged features' signal.
            norms = [torch.linalg.vector_norm(p.grad) for p in self.trained if p.grad is not None]
            self.first_grad_norm = torch.linalg.vector_norm(torch.stack(norms))

    def end_epoch(self, epoch: int) -> str:
        if epoch in self.snapshot_at:
            self.trajectory.append([layer.delta().detach().clone() for layer in self.layers])
        return ""

    def _features(self, weights: Sequence[Tensor], x: Tensor) -> Tensor:
        """Class-token features with every LoRA layer's base weight replaced, differentiably, by `weights`."""
        return functional_call(self.features, dict(zip(self.names, weights)), (x,))

    def end_task(self, task: int, batches: TaskBatches, log: Callable[[str], None]) -> dict:
        K = len(self.trajectory)
        directions = []  # per layer (K, d, k); each snapshot's layer is released once stacked: one copy at a time
        for l in range(len(self.layers)):
            directions.append(torch.stack([snap[l] for snap in self.trajectory]))
            for snap in self.trajectory:
                snap[l] = None
        self.trajectory = []
        for layer in self.layers:
            layer.reset_adapter_()  # from here on the model's outputs come from its base weights alone
        c_init = initial_coefficients(len(self.layers), K, device=self.w0[0].device)
        c = nn.Parameter(c_init.clone())
        opt = torch.optim.Adam([c], lr=self.merge_lr)
        amp = self.w0[0].device.type == "cuda"
        # reconstructed: the merge reads the model's linear head whatever --classifier is: under ridge (and ncm) its
        # rows are the masked cross-entropy's (ncm: the unit means), not the ridge head's (deviation 33).
        head = (self.model.head.weight[:batches.classes.stop].detach(), self.model.head.bias[:batches.classes.stop].detach())
        previous_w = [w0 + m for w0, m in zip(self.w0, self.merged)]  # the previous merged model, W0 + M_{t-1}
        endpoint_w = [w + d[-1] for w, d in zip(previous_w, directions)]  # the fine-tuned endpoint

        def objective(coefficients: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                with torch.no_grad():
                    previous_features = self._features(previous_w, x)
                    endpoint = F.linear(self._features(endpoint_w, x), *head).float()
                    previous = F.linear(previous_features, *head).float()
                return merge_objective(coefficients, w0=self.w0, prev=self.merged, directions=directions,
                                       features_of=self._features, head=head, x=x, y=y, classes=batches.classes,
                                       endpoint=endpoint, previous=previous, previous_features=previous_features,
                                       c_init=c_init, **self.weights)

        fixed, step, t0 = None, 0, time.perf_counter()
        while step < self.merge_steps:
            for x, y in batches:
                step_begin(self.model)  # (with CUDA graphs: a new step)
                fixed = fixed or (x, y)  # the merge's first batch: its objectives are reported before and after
                terms = objective(c, x, y)
                opt.zero_grad(set_to_none=True)
                ranks = batches.ranks  # under torchrun: this rank's slice, weighed by its share, gradients summed
                (terms["total"] if ranks.world == 1 else terms["total"] * batches.shard_weight).backward()
                ranks.sum_gradients_([c])
                opt.step()
                step += 1
                if step == self.merge_steps:
                    break
        with torch.no_grad():
            new = [trajectory_merge(m, d, cl) for m, d, cl in zip(self.merged, directions, c.detach())]
            if not all(torch.isfinite(n).all() for n in new):  # (a host sync: the merge's time is all counted)
                raise UserError(f"TRM's merged delta after task {task + 1} is not finite; lower --merge-lr and rerun.")
            seconds = time.perf_counter() - t0
            info = {"coefficients": c.detach().tolist(), "snapshots": K, "merge_steps": step,
                    "merge_seconds": seconds, "merge_step_seconds": seconds / step if step else None,
                    "first_step_grad_norm": self.first_grad_norm.item() if self.first_grad_norm is not None else None}
            if fixed is not None:
                before, after = ({k: v.item() for k, v in objective(cc, *fixed).items()} for cc in (c_init, c.detach()))
                info["objectives_before"], info["objectives_after"] = before, after
                info["responsiveness_active"] = after["responsiveness"] > 0
                log("  TRM merge, on its first batch: " + "  ".join(f"{k} {before[k]:.4f}->{after[k]:.4f}" for k in before)
                    + f"  (responsiveness hinge {'ACTIVE' if after['responsiveness'] > 0 else 'inactive'})")
            self.merged = new
            for layer, w0, m in zip(self.layers, self.w0, self.merged):
                layer.base.weight.copy_(w0 + m)
        self.trajectory = []  # only M_t is kept
        mean_c = c.detach().mean(0).tolist()
        norm = info["first_step_grad_norm"]
        log(f"  TRM: mean coefficients (c_1..c_K, c_h) [{', '.join(f'{v:+.3f}' for v in mean_c)}]  "
            f"first-step grad norm {'n/a' if norm is None else f'{norm:.4g}'}  merge {step} steps in {seconds:.2f} s")
        return info

    def stored_tensors(self) -> list[Tensor]:
        return [*self.w0, *self.merged]

    def state_dict(self) -> dict:  # W0 is not saved: __init__ reads it from the rebuilt backbone
        return {"merged": self.merged}

    def load_state_dict(self, state: dict) -> None:
        self.merged = [t.to(self.w0[0].device) for t in state["merged"]]


def make_method(model: ViT, args: Args) -> TRM:
    return TRM(model, snapshot_at=snapshot_epochs(args.epochs, args.snapshots or args.epochs),
               merge_steps=args.merge_steps, merge_lr=args.merge_lr, lam_pc=args.lam_pc, lam_gr=args.lam_gr,
               rho=args.rho, mu=args.mu, temperature=args.temperature)


def main(argv: Sequence[str] | None = None) -> dict:
    return run_continual(parse_args(Args, argv, description=__doc__), make_method, "trm")


if __name__ == "__main__":
    main_guard(main)
