"""TreeLoRA: layer-wise LoRAs guided by a hierarchical gradient-similarity K-D tree and an LCB bandit.

Paper: https://arxiv.org/abs/2506.10355 (ICML 2025). The official code covers LLMs only; where it and the paper
disagree we follow the paper (docs/deviations.md, deviations 11-17; TreeLoRA's ViT results also use HiDeLoRA, which this
file does not, deviation 17).

The method in five lines:
  1. One LoRA per target layer is trained on all tasks in turn (never reset).
  2. After task t, store per layer the mean g_t of A over the task's last epoch, and rebuild a K-D tree over the
     past tasks' drifts g_t - g_{t-1}, splitting at depth d on layer d's vectors.
  3. At every step, per layer, a minimum-lower-confidence-bound bandit descends the tree to the past task k
     whose drift is nearest (L1) to this task's drift of A so far: O(depth) per step, not O(tasks). (Ours,
     deviations 35-36: each epoch's bandit starts with one play of every arm; the official code compares
     positions, g_k against the running mean of A, and the paper plays unplayed arms first.)
  4. The loss adds a pull |A - g_k|_1 made scale-free, worth lam_s times the task loss, with lam_s ramping
     linearly from 0 to lam within each epoch.
  5. Only LoRA parameters and the head train, and only the largest entries of each LoRA gradient are kept.

Run:  python treelora.py --tasks 10            (--lam 0 --grad-density 1 is the SeqLoRA baseline)
      python treelora.py --dataset synthetic --tasks 10 --epochs 2 --batch-size 64     (CPU, offline)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from continual import Method, TaskBatches, main_guard, run_continual
from flags import CLArgs, arg, parse_args
from lora_vit import ViT, lora_layers, lora_parameters


@dataclass
class Args(CLArgs):
    """TreeLoRA's flags on top of the shared protocol."""

    lam: float = arg(0.5, "the pull's worth as a fraction of the task loss, ramped from 0 to lam within each "
                          "epoch; 0 with --grad-density 1 is SeqLoRA")
    # reconstructed: c is ours, on the scale of the per-entry L1 rewards (docs/deviations.md, deviation 16).
    lcb_c: float = arg(0.01, "exploration constant c of the lower confidence bound mu - c sqrt(log s / n)")
    grad_density: float = arg(0.5, "fraction of each LoRA gradient's entries kept per step (1: dense)")
    arm: str = arg("tree", "how each layer's past task is chosen: tree (the LCB tree search), random (uniform, "
                           "ablation), previous (always the last task, ablation) or first (always task 1, "
                           "ablation: a fixed anchor)",
                   choices=("tree", "random", "previous", "first"))
    search_start: str = arg("warm", "warm (ours): each epoch's bandit starts with one play of every past task, "
                                    "scored at once (O(tasks) once per epoch) and in units of that play's mean, so "
                                    "that a short epoch can exploit; cold: the paper's, unplayed past tasks first",
                            choices=("warm", "cold"))
    reward: str = arg("drift", "what the bandit compares in L1 with each past task k: drift (ours), this task's "
                               "drift of A so far against g_k - g_{k-1}, the vectors the tree is built on; "
                               "position, the epoch's running mean of A against g_k (the official code)",
                      choices=("drift", "position"))

    def problem(self) -> str | None:
        if not self.lam >= 0 or not math.isfinite(self.lam):
            return "--lam must be a non-negative number; 0 gives the SeqLoRA baseline."
        if not self.lcb_c >= 0 or not math.isfinite(self.lcb_c):
            return "--lcb-c must be a non-negative number."
        if not 0 < self.grad_density <= 1:
            return "--grad-density must be in (0, 1]; 1 keeps the whole gradient."
        return super().problem()


# ----------------------------------------------------------------------------------------------------------
# The K-D tree over past tasks (the official code's tree; docs/deviations.md, deviation 13)


def median_split(tasks: Sequence[int], scores: Tensor) -> tuple[list[int], list[int]]:
    """Tasks scoring at or above the median go left, the rest right, balanced within one.

    Ranking (score descending, ties by task id) and cutting at ceil(n/2) is the rule 'score >= median goes
    left' made exact when scores tie or n is even.
    """
    # reconstructed: the official code's 'score >= torch.median' can put n/2 + 1 on one side; rank instead (deviation 13).
    ranked = sorted(range(len(tasks)), key=lambda i: (-scores[i].item(), tasks[i]))
    half = math.ceil(len(tasks) / 2)
    return [tasks[i] for i in ranked[:half]], [tasks[i] for i in ranked[half:]]


@dataclass
class KDTree:
    """A binary tree stored as arrays (node 0 is the root); leaves hold the tasks."""

    left: Tensor  # (nodes,) int64 child index, -1 at a leaf
    right: Tensor  # (nodes,)
    parent: Tensor  # (nodes,), -1 at the root
    leaf_tasks: Tensor  # (nodes, m) the tasks of each leaf, padded with -1 (all -1 at internal nodes)
    leaf_of_task: Tensor  # (T,) the leaf holding each task
    node_tasks: list[list[int]]  # every node's tasks, for inspection and tests
    height: int  # the deepest leaf's depth

    def to(self, device: torch.device) -> KDTree:
        return KDTree(self.left.to(device), self.right.to(device), self.parent.to(device),
                      self.leaf_tasks.to(device), self.leaf_of_task.to(device), self.node_tasks, self.height)


def build_kdtree(vectors: Sequence[Tensor]) -> KDTree:
    """vectors[l]: (T, n_l), layer l's vector of each past task. Node at depth d splits on layer d's vectors.

    Each task is scored by its dot product with the node's mean vector and the node is cut at the median; a
    node with at most one task, or at depth len(vectors) (one level per LoRA layer), is a leaf.
    """
    T = vectors[0].shape[0]
    left, right, parent, tasks_of, depth_of = [], [], [], [], []

    def grow(tasks: list[int], depth: int, up: int) -> int:
        node = len(tasks_of)
        left.append(-1), right.append(-1), parent.append(up), tasks_of.append(tasks), depth_of.append(depth)
        if len(tasks) > 1 and depth < len(vectors):
            v = vectors[depth][tasks].flatten(1).double()  # (n, D)
            lo, hi = median_split(tasks, v @ v.mean(0))
            left[node] = grow(lo, depth + 1, node)
            right[node] = grow(hi, depth + 1, node)
        return node

    grow(list(range(T)), 0, -1)
    leaves = [n for n in range(len(tasks_of)) if left[n] < 0]
    width = max(len(tasks_of[n]) for n in leaves)
    leaf_tasks = torch.full((len(tasks_of), width), -1, dtype=torch.int64)
    leaf_of_task = torch.empty(T, dtype=torch.int64)
    for n in leaves:
        leaf_tasks[n, : len(tasks_of[n])] = torch.tensor(tasks_of[n])
        leaf_of_task[tasks_of[n]] = n
    return KDTree(torch.tensor(left), torch.tensor(right), torch.tensor(parent), leaf_tasks, leaf_of_task,
                  tasks_of, max(depth_of[n] for n in leaves))


# ----------------------------------------------------------------------------------------------------------
# The bandit: per layer, arms are past tasks, the reward of a play is the L1 distance (lower is better)


def lcb(mean: Tensor, plays: Tensor, beta: float) -> Tensor:
    """mean - beta / sqrt(n), with beta = c * sqrt(log s); -inf for an unplayed arm, so it is played first."""
    return torch.where(plays > 0, mean - beta * plays.clamp(min=1).rsqrt(), -math.inf)


def exhaustive_min_lcb(total: Tensor, plays: Tensor, *, step: int, c: float) -> Tensor:
    """Reference search over every arm: argmin_k mu_k - c sqrt(log s / n_k), per layer. total, plays: (T, L)."""
    return lcb(total / plays.clamp(min=1), plays, c * math.sqrt(math.log(step))).argmin(0)


def tree_search(tree: KDTree, total: Tensor, plays: Tensor, node_mean: Tensor, node_plays: Tensor, *,
                step: int, c: float) -> Tensor:
    """The past task of minimum LCB for every layer at once, found by one root-to-leaf descent per layer.

    total, plays: (T, L) summed rewards and play counts per arm and layer; node_mean, node_plays: (nodes, L)
    the smallest mean and the smallest play count over each node's subtree. min_mean - beta / sqrt(min_n) is a
    lower bound on the LCB of every arm below a node; the descent goes to the child with the smaller bound,
    then takes the best arm of the leaf. O(height) per layer; exact whenever the bound is tight (c = 0, or
    equal play counts); a subtree holding an unplayed arm has bound -inf, so unplayed arms come first.
    """
    # reconstructed: subtree bounds from (min mean, min plays) and a greedy descent (docs/deviations.md, deviation 12).
    beta = c * math.sqrt(math.log(step))
    cols = torch.arange(total.shape[1], device=total.device)
    node = torch.zeros_like(cols)  # every layer starts at the root
    for _ in range(tree.height):
        lo, hi = tree.left[node], tree.right[node]  # -1 at leaves
        bound_lo = lcb(node_mean[lo.clamp(min=0), cols], node_plays[lo.clamp(min=0), cols], beta)
        bound_hi = lcb(node_mean[hi.clamp(min=0), cols], node_plays[hi.clamp(min=0), cols], beta)
        node = torch.where(lo < 0, node, torch.where(bound_lo <= bound_hi, lo, hi))
    arms = tree.leaf_tasks[node]  # (L, m), -1 padded
    n = plays[arms.clamp(min=0), cols[:, None]]
    score = torch.where(arms >= 0, lcb(total[arms.clamp(min=0), cols[:, None]] / n.clamp(min=1), n, beta), math.inf)
    return arms.gather(1, score.argmin(1, keepdim=True)).squeeze(1)


class LCBTreeSearch:
    """The bandit's statistics on the device, with tree_search() to choose and update_() to record a play.

    Select and update both cost O(height) and never synchronise with the host.
    """

    def __init__(self, tree: KDTree, num_layers: int, *, c: float, device: torch.device):
        self.tree = tree.to(device)
        self.c = c
        T, nodes = len(tree.leaf_of_task), len(tree.left)
        self.cols = torch.arange(num_layers, device=device)
        self.total = torch.zeros(T, num_layers, device=device)  # summed rewards per arm and layer
        self.plays = torch.zeros(T, num_layers, device=device)
        self.node_mean = torch.full((nodes, num_layers), math.inf, device=device)  # min mean over the subtree
        self.node_plays = torch.zeros(nodes, num_layers, device=device)  # min play count over the subtree
        members = torch.full((nodes, max(map(len, tree.node_tasks))), -1, dtype=torch.int64)
        for node, tasks in enumerate(tree.node_tasks):
            members[node, :len(tasks)] = torch.tensor(tasks, dtype=torch.int64)
        self.members = members.to(device)  # (nodes, width) each node's tasks, -1 padded: warm starts index on the
        self.step = 0  # device (a list index would copy from the host inside a training step)

    def reset_(self) -> None:
        """Statistics restart every epoch (the paper)."""
        self.total.zero_(), self.plays.zero_(), self.node_mean.fill_(math.inf), self.node_plays.zero_()
        self.step = 0

    def warm_start_(self, rewards: Tensor) -> None:
        """One play of every arm at once, rewards (T, L): the statistics that playing each arm once leaves, so that
        the descent can exploit from the next step rather than first play every arm in turn."""
        self.total.copy_(rewards)
        self.plays.fill_(1)
        self.node_plays.fill_(1)
        below = rewards[self.members.clamp(min=0)]  # (nodes, width, L)
        self.node_mean.copy_(below.masked_fill((self.members < 0)[..., None], math.inf).min(1).values)
        self.step = rewards.shape[0]

    def select(self) -> Tensor:
        """The past task chosen for each layer, (L,) int64, on the device."""
        self.step += 1
        return tree_search(self.tree, self.total, self.plays, self.node_mean, self.node_plays, step=self.step,
                           c=self.c)

    def update_(self, arms: Tensor, rewards: Tensor) -> None:
        """Record one play per layer (arms, rewards: (L,)) and refresh the bounds on the path to the root."""
        t, cols = self.tree, self.cols
        self.total[arms, cols] += rewards
        self.plays[arms, cols] += 1
        node = t.leaf_of_task[arms]  # (L,)
        members = t.leaf_tasks[node]  # (L, m), -1 padded
        valid = members >= 0
        plays = self.plays[members.clamp(min=0), cols[:, None]]
        mean = torch.where(valid & (plays > 0), self.total[members.clamp(min=0), cols[:, None]] / plays.clamp(min=1),
                           math.inf)  # an unplayed arm has no mean yet; its count 0 makes the bound -inf
        plays = torch.where(valid, plays, math.inf)  # padding never lowers the minimum
        self.node_mean[node, cols] = mean.min(1).values
        self.node_plays[node, cols] = plays.min(1).values
        for _ in range(t.height):
            up = t.parent[node]
            node = torch.where(up >= 0, up, node)  # the root stays the root
            lo, hi = t.left[node].clamp(min=0), t.right[node].clamp(min=0)
            internal = t.left[node] >= 0
            self.node_mean[node, cols] = torch.where(
                internal, torch.minimum(self.node_mean[lo, cols], self.node_mean[hi, cols]), self.node_mean[node, cols])
            self.node_plays[node, cols] = torch.where(
                internal, torch.minimum(self.node_plays[lo, cols], self.node_plays[hi, cols]), self.node_plays[node, cols])


def nearest_past(vectors: Sequence[Tensor]) -> list[int]:
    """Per layer, the past task k < t whose vector is nearest in mean L1 to the last task t's (vectors: per layer
    (t + 1, ...)); the exhaustive answer the search approximates, for the structure measures (continual.py)."""
    return [int((v[:-1] - v[-1:]).flatten(1).abs().mean(1).argmin()) for v in vectors]


# ----------------------------------------------------------------------------------------------------------
# Regulariser and sparse updates


def l1_pull(A: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Per layer, the mean absolute difference |A^l - g^l|_1 / n_l; shape (L,). Zero where A equals its target."""
    return torch.stack([(a - g).abs().mean() for a, g in zip(A, targets)])


def scale_free(pull: Tensor, task_loss: Tensor, lam: float) -> Tensor:
    """lam * L_task * pull / pull, gradients through the numerator only: worth lam times the task loss whatever
    the pull's scale, so it neither vanishes nor dominates (the official code's normalisation, deviation 16)."""
    return lam * task_loss.detach() * pull / (pull.detach() + 1e-5)


def sparsify_gradients_(params: Sequence[nn.Parameter], density: float) -> None:
    """Keep the ceil(density * n) largest-magnitude entries of each gradient, zero the rest, in place."""
    # reconstructed: the paper's 'sparse gradient updates' as magnitude top-k per step (docs/deviations.md, deviation 15).
    for p in params:
        if p.grad is not None:
            flat = p.grad.view(-1)
            top = flat.abs().topk(math.ceil(density * flat.numel()), sorted=False).indices
            keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, top, True)  # scatter: no host sync, where
            flat.masked_fill_(~keep, 0)  # keep[top] = True (index_put_) synchronised once per tensor and step


# ----------------------------------------------------------------------------------------------------------
# Wiring into the loop


class TreeLoRA(Method):
    """TreeLoRA: one LoRA continued across tasks, pulled each step toward the past task the tree search picks."""

    def __init__(self, model: ViT, *, lam: float, lcb_c: float, grad_density: float, arm: str,
                 search_start: str = "warm", reward: str = "drift"):
        self.head = model.head
        self.layers = lora_layers(model)
        self.lam = lam
        self.lcb_c = lcb_c
        self.grad_density = grad_density
        self.arm = arm
        self.warm_start = search_start == "warm"
        self.reward = reward
        self.reward_scale: Tensor | float = 1.0  # warm: per layer, the mean distance of the epoch's first play
        self.g: list[Tensor] = []  # per layer (tasks so far, r, k): mean A over each task's last epoch
        self.drifts: list[Tensor] = []  # per layer (tasks so far, r*k): g_t - g_{t-1}, what the tree is built on
        self.previous: list[Tensor] = []  # g_{t-1} per layer (the initial A before task 1)
        self.tree: KDTree | None = None
        self.search: LCBTreeSearch | None = None
        self.a_sum: list[Tensor] = []  # running sum of A over the epoch's steps
        self.step = 0  # steps taken in this epoch
        self.steps_per_epoch = 1
        self.last_epoch_mean: list[Tensor] = []
        self.chosen: Tensor | None = None  # (past tasks, L) selection counts during the current task
        self.reg_grads: list[Tensor] = []  # this step's gradient of the pull on each A
        self.grad_norms = torch.zeros(2)  # over the epoch: summed |grad reg| and |grad CE| on the LoRA factors

    def begin_task(self, task: int, batches: TaskBatches) -> list[nn.Parameter]:
        if task == 0:
            self.previous = [layer.A.detach().clone() for layer in self.layers]
        self.a_sum, self.step, self.steps_per_epoch = [torch.zeros_like(layer.A) for layer in self.layers], 0, len(batches)
        self.grad_norms = torch.zeros(2, device=self.layers[0].A.device)
        self.ratios: list[float] = []  # per epoch, |grad reg| / |grad CE| (results.json, mechanism.png)
        if self.g:
            self.chosen = torch.zeros(task, len(self.layers), device=self.layers[0].A.device)
        return [*lora_parameters(self.layers), *self.head.parameters()]

    def _choose(self) -> Tensor:
        """The past task for each layer, (L,) int64 on the device."""
        T, L, device = self.g[0].shape[0], len(self.layers), self.g[0].device
        if self.arm == "random":  # ablation: uniform over the past tasks, from the seeded global generator
            return torch.randint(T, (L,), device=device)
        if self.arm == "previous":  # ablation: always the last task
            return torch.full((L,), T - 1, device=device)
        if self.arm == "first":  # ablation: always task 1, a fixed anchor that no search chooses
            return torch.zeros(L, dtype=torch.long, device=device)
        return self.search.select()

    def penalty(self, task_loss: Tensor) -> Tensor | None:
        self.step += 1
        for acc, layer in zip(self.a_sum, self.layers):
            acc += layer.A.detach()  # A as this step sees it
        if not self.g or self.lam == 0:
            return None
        if self.arm == "tree":
            # the bandit's arms: per layer, g_k (the official code) or the drifts g_k - g_{k-1} (deviation 36)
            running = [acc / self.step for acc in self.a_sum]  # the epoch's running mean of A
            if self.reward == "drift":  # reconstructed: this drift so far against the tree's vectors (deviation 36)
                here, arms = [(a - p).flatten() for a, p in zip(running, self.previous)], self.drifts
            else:
                here, arms = running, self.g
            if self.warm_start and self.step == 1:
                # reconstructed: an epoch here has ~10 steps and up to 19 past tasks, so a cold bandit, which plays
                # every unplayed arm first, never gets to exploit; one play of every arm at once, and rewards in
                # units of that play's mean distance per layer, so that c is relative (deviation 35).
                first = torch.stack([(v - h).flatten(1).abs().mean(1) for v, h in zip(arms, here)], 1)  # (T, L)
                self.reward_scale = first.mean(0).clamp(min=1e-12)
                self.search.warm_start_(first / self.reward_scale)
        k = self._choose()  # (L,)
        targets = [g.index_select(0, k[l:l + 1])[0] for l, g in enumerate(self.g)]  # g_k per layer, no host sync
        if self.arm == "tree":  # the reward: the L1 distance of what the arms measure
            chosen = targets if self.reward == "position" else [
                d.index_select(0, k[l:l + 1])[0] for l, d in enumerate(arms)]
            self.search.update_(k, l1_pull(here, chosen) / self.reward_scale)
        self.chosen[k, torch.arange(len(self.layers), device=k.device)] += 1
        A = [layer.A for layer in self.layers]
        reg = scale_free(l1_pull(A, targets).sum(), task_loss, self.lam * self.step / self.steps_per_epoch)  # lam_s
        self.reg_grads = torch.autograd.grad(reg, A, retain_graph=True)  # for the logged gradient ratio
        return reg

    def after_backward(self) -> None:
        if self.reg_grads:  # the CE gradient is what the pull did not contribute (the ratio is of epoch sums: at a
            # task's first step the new head rows are zero, so no CE gradient reaches the LoRA factors at all)
            reg = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in self.reg_grads]))
            ce = [layer.A.grad - g for layer, g in zip(self.layers, self.reg_grads)] + [l.B.grad for l in self.layers]
            ce = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ce]))
            self.grad_norms += torch.stack([reg, ce])
            self.reg_grads = []
        if self.grad_density < 1:
            sparsify_gradients_(lora_parameters(self.layers), self.grad_density)

    def end_epoch(self, epoch: int) -> str:
        self.last_epoch_mean = [acc / self.step for acc in self.a_sum]
        reg, ce = self.grad_norms.tolist()
        note = f"|grad reg| / |grad CE| {reg / ce:.3f}" if self.chosen is not None and self.lam and ce > 0 else ""
        if note:
            self.ratios.append(reg / ce)
        self.a_sum, self.step = [torch.zeros_like(acc) for acc in self.a_sum], 0
        self.grad_norms.zero_()
        if self.search is not None:
            self.search.reset_()
        return note

    @torch.no_grad()
    def end_task(self, task: int, batches: TaskBatches, log: Callable[[str], None]) -> dict:
        if self.lam == 0:  # SeqLoRA or its sparse variant: nothing is pulled, so nothing needs keeping
            return {}
        mean_a = self.last_epoch_mean  # g_t per layer
        # reconstructed: the first task's drift is measured from the initial A (docs/deviations.md, deviation 14).
        drift = [(m - p).flatten()[None] for m, p in zip(mean_a, self.previous)]  # (1, r*k) per layer
        self.drifts = [torch.cat([old, d]) for old, d in zip(self.drifts, drift)] if self.drifts else drift
        self.g = [torch.cat([g, m[None]]) for g, m in zip(self.g, mean_a)] if self.g else [m[None] for m in mean_a]
        self.previous = mean_a
        self._rebuild_tree()
        info = {"tree_height": self.tree.height}
        if task:  # what an exhaustive search would call this task's nearest past task, per layer, two ways
            info["nearest_position"] = nearest_past(self.g)  # g_t against g_k: what the bandit's reward measures
            info["nearest_drift"] = nearest_past(self.drifts)  # g_t - g_{t-1} against g_k - g_{k-1}: gradients
        if self.chosen is not None:
            info["selections"] = self.chosen.T.tolist()  # per layer, how often each past task was chosen
            info["grad_ratio_per_epoch"] = self.ratios
            share = self.chosen.sum(1) / self.chosen.sum()  # over layers: the share of picks of each past task
            log(f"  TreeLoRA ({self.arm}): picks of past tasks 1..{task}: "
                f"[{', '.join(f'{100 * s:.0f}%' for s in share.tolist())}]; tree of {task + 1} tasks, "
                f"height {self.tree.height}")
        return info

    def _rebuild_tree(self) -> None:
        self.tree = build_kdtree([d.cpu() for d in self.drifts])
        self.search = LCBTreeSearch(self.tree, len(self.layers), c=self.lcb_c, device=self.g[0].device)

    def stored_tensors(self) -> list[Tensor]:
        return [*self.g, *self.drifts]

    def state_dict(self) -> dict:
        return {"g": self.g, "drifts": self.drifts, "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        device = self.layers[0].A.device
        self.g, self.drifts, self.previous = ([t.to(device) for t in state[k]] for k in ("g", "drifts", "previous"))
        if self.g:
            self._rebuild_tree()

    def summary(self) -> dict:  # tasks counted from 1
        return {"tree": [[t + 1 for t in node] for node in self.tree.node_tasks] if self.tree else []}


def make_method(model: ViT, args: Args) -> TreeLoRA:
    return TreeLoRA(model, lam=args.lam, lcb_c=args.lcb_c, grad_density=args.grad_density, arm=args.arm,
                    search_start=args.search_start, reward=args.reward)


def main(argv: Sequence[str] | None = None) -> dict:
    return run_continual(parse_args(Args, argv, description=__doc__), make_method, "treelora")


if __name__ == "__main__":
    main_guard(main)
