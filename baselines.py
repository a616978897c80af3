"""The baselines every method is measured against, under the same protocol, seeds, budget and head.

  --baseline frozen   the pretrained backbone as it is, no adapter: only the head learns (the masked
                      cross-entropy, then --classifier). With --classifier ncm this is the nearest class mean
                      of SimpleCIL (Zhou et al., arXiv 2303.07338) and Janson et al. (arXiv 2210.04428): it
                      trains nothing, one feature pass per task, the field's floor. With the methods' own head
                      it is the ablation of adaptation itself.
  --baseline first-session
                      first-session adaptation (RanPAC's phase 1, McDonnell et al. arXiv 2307.02251; APER/ADAM,
                      Zhou et al. arXiv 2303.07338): one LoRA and the head train on task 1 only, then the
                      backbone is frozen for good and only the head learns. With --classifier ridge this is
                      RanPAC.
  --baseline joint    one LoRA and the head trained on every task's data at once, as a single task with the
                      same epochs: the upper bound a continual learner is measured against.

SeqLoRA (one LoRA trained on the tasks in turn, nothing else) is treelora.py --lam 0 --grad-density 1.

Run:  python baselines.py --baseline frozen --classifier ncm --dataset fashion-mnist --data-root DIR --weights FILE
      python baselines.py --baseline first-session --classifier ridge --dataset fashion-mnist --data-root DIR \
          --weights FILE
      python baselines.py --baseline joint --dataset synthetic --epochs 2 --batch-size 64      (CPU, offline)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch.nn as nn

from continual import Method, TaskBatches, main_guard, run_continual
from flags import CLArgs, arg, parse_args, parse_heads
from lora_vit import ViT, lora_layers, lora_parameters


@dataclass
class Args(CLArgs):
    """The baseline's choice on top of the shared protocol."""

    baseline: str = arg("frozen", "frozen (no adapter, only the head), first-session (the LoRA trains on task 1 "
                                  "only, then only the head) or joint (all tasks' data at once)",
                        choices=("frozen", "first-session", "joint"))


def trains_head(args: CLArgs) -> bool:
    """Whether any head of the run (--classifier, --compare-heads) starts from the rows the masked cross-entropy
    trains (linear, align); ncm and ridge replace them outright, so a frozen backbone then trains nothing."""
    kinds = {args.classifier, *(kind for _, kind, _, _ in parse_heads(args.compare_heads, args.rp_dim))}
    return bool(kinds & {"linear", "align"})


class Frozen(Method):
    """The backbone is never trained; the head's rows are trained by the masked cross-entropy unless every head
    replaces them outright (ncm, ridge), in which case nothing trains at all."""

    def __init__(self, model: ViT, train_head: bool):
        self.head, self.layers, self.train_head = model.head, lora_layers(model), train_head

    def begin_task(self, task: int, batches: TaskBatches) -> list[nn.Parameter]:
        for p in lora_parameters(self.layers):
            p.requires_grad_(False)  # no backward pass through the backbone for an adapter that never trains
        return list(self.head.parameters()) if self.train_head else []


class FirstSession(Frozen):
    """One LoRA and the head train on the first task; from the second on the backbone is frozen (Frozen)."""

    def begin_task(self, task: int, batches: TaskBatches) -> list[nn.Parameter]:
        # reconstructed: the first session trains with the methods' Adam and budget, where RanPAC uses SGD with a
        # cosine schedule (docs/deviations.md, deviation 31).
        if task == 0:
            return [*lora_parameters(self.layers), *self.head.parameters()]
        return super().begin_task(task, batches)


class PlainLoRA(Method):
    """One LoRA on every target layer, continued from task to task, with the head: the joint run's learner."""

    def __init__(self, model: ViT):
        self.head, self.layers = model.head, lora_layers(model)

    def begin_task(self, task: int, batches: TaskBatches) -> list[nn.Parameter]:
        return [*lora_parameters(self.layers), *self.head.parameters()]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(Args, argv, description=__doc__)
    if args.baseline == "frozen":
        name = "ncm" if args.classifier == "ncm" else "frozen"
        return run_continual(args, lambda model, a: Frozen(model, trains_head(a)), name)
    if args.baseline == "first-session":
        return run_continual(args, lambda model, a: FirstSession(model, trains_head(a)), "first-session")
    # reconstructed: joint = one task holding every class, with the per-task epoch budget (docs/deviations.md, deviation 26).
    return run_continual(replace(args, tasks=1), lambda model, a: PlainLoRA(model), "joint")


if __name__ == "__main__":
    main_guard(main)
