"""HAM: Hierarchical Adapter Merging for scalable continual learning, on a LoRA-ViT.

Paper: https://arxiv.org/abs/2509.13211 (no public code; what the paper leaves open is reconstructed and
listed in the docs/deviations.md, deviations 6-10).

The method in five lines:
  1. Each task t trains a fresh LoRA adapter tau_t whose scale is its learned importance scalar alpha_t.
  2. The task's delta alpha_t * tau_t is pruned to its largest-magnitude entries and rescaled to keep its norm.
  3. It joins the most similar of at most G groups (mean layer-wise cosine), or opens a new group.
  4. A group's delta is the sum of its members, re-pruned to the same entry budget; across groups they add.
  5. Everything folds into the frozen weights, so inference costs exactly the backbone.

Run:  python ham.py --tasks 20                                   (GPU: CIFAR-100, ViT-B/16 ImageNet weights)
      python ham.py --dataset synthetic --tasks 10 --epochs 2 --batch-size 64      (CPU, offline)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from continual import Method, TaskBatches, UserError, main_guard, run_continual
from flags import CLArgs, arg, parse_args
from lora_vit import ViT, lora_layers, lora_parameters


@dataclass
class Args(CLArgs):
    """HAM's flags on top of the shared protocol."""

    density: float = arg(0.5, "fraction of entries kept by magnitude pruning, of each task delta and of each "
                              "group delta (1: no pruning, and then the grouping changes nothing)")
    groups: int = arg(5, "maximum number of groups G_max (= --tasks: no merging, every task its own group)")
    threshold: float = arg(0.05, "cosine at or above which a task joins its most similar group rather than "
                                 "open a new one while groups are free")
    importance: str = arg("learned", "learned: the adapter's scale is a learned scalar alpha_t (B at unit norm); "
                                     "fixed: a plain LoRA, alpha_t = 1 (ablation)", choices=("learned", "fixed"))
    grouping: str = arg("similarity", "how a task chooses its group: by similarity, or at random (ablation)",
                        choices=("similarity", "random"))
    adapter_init: str = arg("fresh", "fresh: A and B redrawn at full scale for each task; shared: every task's "
                                     "adapter starts from the same A and a near-zero B, so that its delta's "
                                     "direction is what the task learned, in coordinates all tasks share (ours)",
                            choices=("fresh", "shared"))

    def problem(self) -> str | None:
        if not 0 < self.density <= 1:
            return "--density must be in (0, 1]; 1 disables pruning."
        if self.groups < 1:
            return "--groups must be at least 1."
        if not -1 <= self.threshold <= 1:
            return "--threshold is a cosine similarity and must lie in [-1, 1]."
        return super().problem()


B_INIT_STD = 1e-6  # a shared adapter's B at start: far below one Adam step (~lr), so B soon is what was learned

# ----------------------------------------------------------------------------------------------------------
# Steps 2-4 as pure functions on tensors


# reconstructed: one alpha_t per task, shared by its layers, scales a unit-norm adapter (docs/deviations.md,
# deviation 6); LoRALinear computes the same with `importance` set and `unit_b` on.
def importance_delta(alpha: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Step 1, the learned importance: a task's adapter is alpha_t times a unit-norm direction,
    delta = alpha_t * scale * (B / |B|_F) A, shape (d, k), scale = lora_alpha / r.

    alpha_t starts at 0, so a fresh adapter changes nothing; what it learns is the task's importance, the scale at
    which the task's delta enters the groups (and, pruned and rescaled, the backbone)."""
    return alpha * (scale * ((B / torch.linalg.matrix_norm(B)) @ A))


def importance_lr_scale(B: Tensor) -> float:
    """alpha_t's Adam learning rate over the factors': Adam moves each of B's d*r entries by about lr a step, so a
    plain LoRA's |B|_F moves by about lr * sqrt(d*r); alpha_t stands for that norm and gets that step."""
    return math.sqrt(B.numel())


def prune_by_magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep the ceil(density * n) entries of largest magnitude, zero the rest (step 2, 'prune')."""
    if density >= 1.0:
        return delta.clone()
    flat = delta.flatten()
    kept = flat.abs().topk(math.ceil(density * flat.numel()), sorted=False).indices
    out = torch.zeros_like(flat)
    out[kept] = flat[kept]
    return out.view_as(delta)


def rescale_to_norm(pruned: Tensor, reference: Tensor) -> Tensor:
    """Scale `pruned` so that its Frobenius norm equals `reference`'s (step 2, 'scale')."""
    # reconstructed: the abstract says 'pruned, scaled'; we read 'scaled' as restoring the unpruned norm (dev. 7).
    norm = pruned.norm()
    return pruned * (reference.norm() / norm) if norm > 0 else pruned.clone()


def mean_cosine(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> float:
    """Mean over layers of cos(x^l, y^l), each layer's delta flattened (step 3)."""
    cos = [F.cosine_similarity(x.flatten().float(), y.flatten().float(), dim=0) for x, y in zip(xs, ys)]
    return torch.stack(cos).mean().item()


def choose_group(similarities: Sequence[float], *, max_groups: int, threshold: float,
                 tasks_left: int) -> tuple[int, str]:
    """(index of the group a new task joins, why); index len(similarities) means 'open a new group' (step 3).

    A new group opens while fewer than max_groups exist and either no group is similar enough
    (best cosine < threshold) or there is a free group for every task still to come (tasks_left counts
    the current one), so that max_groups = T means no merging at all.
    """
    # reconstructed: the free-slot clause makes 'G_max = T' the no-merging ablation (docs/deviations.md, deviation 8).
    n = len(similarities)
    best = max(range(n), key=lambda g: similarities[g]) if n else -1
    if n == 0:
        return 0, "the first task opens a group"
    if n < max_groups and max_groups - n >= tasks_left:
        return n, f"a free group for each of the {tasks_left} tasks left"
    if n < max_groups and similarities[best] < threshold:
        return n, f"best cosine {similarities[best]:+.3f} < threshold {threshold:g}"
    if n < max_groups:
        return best, f"best cosine {similarities[best]:+.3f} >= threshold {threshold:g}"
    return best, f"all {max_groups} groups taken; the most similar has cosine {similarities[best]:+.3f}"


@dataclass(frozen=True)
class Group:
    """One group: its members and its delta, one (d, k) float32 tensor per LoRA layer (step 4)."""

    members: tuple[int, ...]  # task indices, 0-based
    delta: tuple[Tensor, ...]


def merge_into_group(group_delta: Sequence[Tensor], pruned: Sequence[Tensor], density: float) -> list[Tensor]:
    """Step 4 inside a group: the members' deltas add, then the sum is re-pruned to the same entry budget and
    rescaled to the sum's norm, so that a group stores and applies no more than one task does."""
    # reconstructed: 'concatenated' read as a sum (no 1/n dilution); re-pruning is the group step (deviation 9).
    return [rescale_to_norm(prune_by_magnitude(g + p, density), g + p) for g, p in zip(group_delta, pruned)]


def consolidate(deltas: Sequence[Tensor], groups: Sequence[Group], *, task: int, density: float, max_groups: int,
                threshold: float, tasks_left: int,
                choice: int | None = None) -> tuple[list[Group], int, list[float], str]:
    """One task's consolidation, steps 2-4: prune and scale its deltas, choose a group, merge into it.

    deltas: alpha_t * tau_t^l per LoRA layer; choice: a group index chosen elsewhere (the random-grouping
    ablation), else by similarity. Returns (the new groups, the chosen group's index, the task's similarity to
    each earlier group, why that group); the inputs are not modified.
    """
    pruned = [rescale_to_norm(prune_by_magnitude(d.float(), density), d.float()) for d in deltas]  # step 2
    similarities = [mean_cosine(pruned, g.delta) for g in groups]  # step 3
    g, why = choose_group(similarities, max_groups=max_groups, threshold=threshold, tasks_left=tasks_left)
    if choice is not None:
        g, why = choice, "random grouping"
    if g == len(groups):
        return [*groups, Group((task,), tuple(pruned))], g, similarities, why
    joined = Group(groups[g].members + (task,), tuple(merge_into_group(groups[g].delta, pruned, density)))
    return [*groups[:g], joined, *groups[g + 1:]], g, similarities, why


def merged_delta(groups: Sequence[Group]) -> list[Tensor]:
    """Step 4 across groups, the hierarchy's top: sum_g Delta_g per layer, so that W = W0 + sum_g Delta_g."""
    return [sum(parts) for parts in zip(*(g.delta for g in groups))]


# ----------------------------------------------------------------------------------------------------------
# Wiring into the loop


class HAM(Method):
    """Hierarchical Adapter Merging: steps 1 and 5 here, steps 2-4 in consolidate()."""

    def __init__(self, model: ViT, *, tasks: int, density: float, max_groups: int, threshold: float,
                 importance: str, grouping: str, adapter_init: str = "fresh"):
        self.head = model.head
        self.layers = lora_layers(model)
        self.tasks = tasks
        self.density = density
        self.max_groups = max_groups
        self.threshold = threshold
        self.learn_importance = importance == "learned"
        self.random_grouping = grouping == "random"
        self.w0 = [layer.base.weight.detach().clone() for layer in self.layers]  # the frozen W0 of every layer
        # reconstructed: the paper does not say how a task's adapter starts (docs/deviations.md, deviation 34).
        # With lr 1e-4 and ~30 steps a task moves each entry of A and B by ~3e-3: an adapter redrawn per task
        # (A Kaiming, entries ~0.05; B ~ N(0, 1)) keeps its random start as its direction, and two tasks' deltas
        # have cosine ~1e-3 whatever they learned. Shared: every task starts from the A the seed drew (kept here,
        # a fixed r x k per layer) and from B_INIT_STD * the same B, so after one step B is what the task learned.
        self.shared_init = adapter_init == "shared"
        self.a0 = [layer.A.detach().clone() for layer in self.layers] if self.shared_init else []
        self.b0 = [B_INIT_STD * torch.randn_like(layer.B) for layer in self.layers] if self.shared_init else []
        self.groups: list[Group] = []
        self.importance: nn.Parameter | None = None

    def begin_task(self, task: int, batches: TaskBatches) -> list[nn.Parameter]:
        # Step 1: a fresh adapter; the earlier groups are already in W.
        for i, layer in enumerate(self.layers):
            layer.reset_adapter_()
            if self.shared_init:
                with torch.no_grad():
                    layer.A.copy_(self.a0[i])
        if not self.learn_importance:  # ablation: a plain LoRA, alpha_t = 1
            return [*lora_parameters(self.layers), *self.head.parameters()]
        # reconstructed: one alpha_t per task, shared by its layers, is the adapter's scale: B is used at unit
        # norm and alpha_t starts at 0, so the fresh adapter changes nothing (docs/deviations.md, deviation 6).
        self.importance = nn.Parameter(torch.zeros((), device=self.w0[0].device))
        for i, layer in enumerate(self.layers):
            with torch.no_grad():
                if self.shared_init:
                    layer.B.copy_(self.b0[i])
                else:
                    nn.init.normal_(layer.B)
            layer.importance, layer.unit_b = self.importance, True
        # reconstructed: alpha_t's step stands for a plain LoRA's |B|_F step (docs/deviations.md, deviation 6).
        return [{"params": [self.importance], "lr_scale": importance_lr_scale(self.layers[0].B)},
                *lora_parameters(self.layers),
                *self.head.parameters()]

    @torch.no_grad()
    def end_task(self, task: int, batches: TaskBatches, log: Callable[[str], None]) -> dict:
        alpha = self.importance.item() if self.learn_importance else 1.0
        choice = None
        if self.random_grouping:  # ablation: any existing group, or a new one while groups are free
            choice = int(torch.randint(min(len(self.groups) + 1, self.max_groups), ()).item())
        groups, g, similarities, why = consolidate(
            [layer.delta() for layer in self.layers], self.groups, task=task, density=self.density,
            max_groups=self.max_groups, threshold=self.threshold, tasks_left=self.tasks - task, choice=choice)
        total = merged_delta(groups)
        if not all(torch.isfinite(t).all() for t in total):
            raise UserError(f"HAM's merged weights after task {task + 1} are not finite; lower --lr and rerun.")
        opened = g == len(self.groups)
        self.groups = groups
        # Step 5, W = W0 + sum_g Delta_g, recomputed from the kept W0 (no accumulated rounding; deviation 10).
        for layer, w0, t in zip(self.layers, self.w0, total):
            layer.base.weight.copy_(w0 + t)
            layer.importance, layer.unit_b = None, False
            layer.reset_adapter_()
        log(f"  HAM: alpha={alpha:.3f}  similarities=[{', '.join(f'{s:+.3f}' for s in similarities)}]  "
            f"-> {'opens' if opened else 'joins'} group {g + 1} ({why})  groups={self.summary()['groups']}")
        return {"importance": alpha, "similarities": similarities, "group": g + 1, "opened": opened, "why": why}

    def stored_tensors(self) -> list[Tensor]:
        return [*self.w0, *self.a0, *self.b0, *(t for g in self.groups for t in g.delta)]  # a0, b0: shared only

    def summary(self) -> dict:
        return {"groups": [[m + 1 for m in g.members] for g in self.groups]}  # tasks counted from 1

    def state_dict(self) -> dict:  # W0 is not saved: __init__ reads it from the rebuilt backbone
        return {"groups": [{"members": list(g.members), "delta": list(g.delta)} for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        device = self.w0[0].device
        self.groups = [Group(tuple(s["members"]), tuple(t.to(device) for t in s["delta"])) for s in state["groups"]]


def make_method(model: ViT, args: Args) -> HAM:
    return HAM(model, tasks=args.tasks, density=args.density, max_groups=args.groups, threshold=args.threshold,
               importance=args.importance, grouping=args.grouping, adapter_init=args.adapter_init)


def main(argv: Sequence[str] | None = None) -> dict:
    return run_continual(parse_args(Args, argv, description=__doc__), make_method, "ham")


if __name__ == "__main__":
    main_guard(main)
