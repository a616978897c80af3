"""The baselines every method is measured against, under the same protocol, seeds, budget and head.

  --baseline frozen   the pretrained backbone as it is, no adapter: only the head learns (the masked
                      cross-entropy, then --classifier). With --classifier ncm this is the nearest class mean
                      of SimpleCIL (Zhou et al., arXiv 2303.07338) and Janson et al. (arXiv 2210.04428): it
                      trains nothing, one feature pass per task, the field's floor. With the methods' own head
                      it is the ablation of adaptation itself.
  --baseline joint    one LoRA and the head trained on every task's data at once, as a single task with the
                      same epochs: the upper bound a continual learner is measured against.

SeqLoRA (one LoRA trained on the tasks in turn, nothing else) is treelora.py --lam 0 --grad-density 1.

Run:  python baselines.py --baseline frozen --classifier ncm --dataset fashion-mnist --data-root DIR --weights FILE
      python baselines.py --baseline joint --dataset synthetic --epochs 2 --batch-size 64      (CPU, offline)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch.nn as nn

from continual import CLArgs, Method, TaskBatches, arg, main_guard, parse_args, run_continual
from lora_vit import ViT, lora_layers, lora_parameters


@dataclass
class Args(CLArgs):
    """The baseline's choice on top of the shared protocol."""

    baseline: str = arg("frozen", "frozen (no adapter, only the head) or joint (all tasks' data at once)",
                        choices=("frozen", "joint"))


class Frozen(Method):
    """The backbone is never trained; the head's rows are trained by the masked cross-entropy unless the
    classifier replaces them outright (ncm), in which case nothing trains at all."""

    def __init__(self, model: ViT, classifier: str):
        self.head, self.train_head = model.head, classifier != "ncm"

    def begin_task(self, task: int, batches: TaskBatches) -> list[nn.Parameter]:
        return list(self.head.parameters()) if self.train_head else []


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
        return run_continual(args, lambda model, a: Frozen(model, a.classifier), name)
    # reconstructed: joint = one task holding every class, with the per-task epoch budget (README, deviation 26).
    return run_continual(replace(args, tasks=1), lambda model, a: PlainLoRA(model), "joint")


if __name__ == "__main__":
    main_guard(main)
