"""The continual-learning protocol shared by ham.py, treelora.py and trm.py.

Read top to bottom: seeding (the only place anything is seeded), several processes (torchrun), the data the
loop serves (the readers are in data.py), the model a run builds, the metrics and evaluation, the `Method`
hooks, the training loop and its GPU path, checkpoints, and the run around it: the head's treatment after each
task (classifier.py), --resume. The flags are in flags.py; what a run writes and draws (log, results.json,
pictures, the structure measures) in report.py.

The protocol (class-incremental): T tasks of disjoint classes in the order RandomState(class_seed)
.permutation(n); one head over all classes; while task t trains, the cross-entropy sees only task t's logits
(old head rows get no gradient); at test time, no task id: argmax over every class seen so far.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import sys
import time
import traceback
import warnings
from copy import deepcopy
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from classifier import LDC_VIEWS, Classifier, WeakMap, adversarial_pairs, copy_generator, weak_map
from data import (SplitData, UserError, class_order, domain_class_order, domain_task_layout, load_cifar100,
                  load_fashion_mnist, make_synthetic, read_image_folder, split_data, with_domains)
from flags import CLArgs, bf16_autocast, domain_task_counts, normalization_values, parse_heads, parse_lambdas
from lora_vit import (PRESETS, TORCHVISION_WEIGHTS, LoRALinear, ViT, ViTConfig, WeightsError, add_lora_,
                      config_from_state_dict, hub_normalization, hub_weights, is_hub_name, load_backbone_,
                      read_weights_file, torchvision_weights)
from report import (RunLog, describe_drift_recovery, describe_structure, draw, drift_recovery, format_seconds,
                    readable_json, redraw, structure_measures, write_atomic)

# what a process that starts runs imports once for all of them (bench's jobs, the resume tests' kills): torch imports
# its compiler on a run's first optimiser (about 1.4 s here) and pyplot draws every run's pictures (0.6 s); a module
# that is not installed is skipped
PRELOAD = ("continual", "ham", "treelora", "trm", "baselines", "torch._dynamo", "matplotlib.pyplot")

# ----------------------------------------------------------------------------------------------------------
# Seeding: the one place


def seed_everything(seed: int) -> None:
    """Global seeds (model initialisation, fresh adapters); batches and augmentation use the generators below."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def run_generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(batch order on the host, augmentation on the data's device); saved in every checkpoint."""
    return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 1)


def head_generator(seed: int, task: int, device: torch.device) -> torch.Generator:
    """The classifier's sampling after `task`: a function of (seed, task) alone, so a resumed run needs no state."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + task + 2)


def view_generator(seed: int, task: int, device: torch.device) -> torch.Generator:
    """The augmented views LDC's projector is fitted on after `task` (classifier.LDC_VIEWS): drawn twice from this
    seed, under the backbone before the task and after it, so both backbones see the same views."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + task + 50_000_017)


def random_projection(seed: int, dim: int, width: int, device: torch.device) -> Tensor | None:
    """The ridge head's fixed projection W (dim, width), N(0, 1) entries (RanPAC's torch.randn), drawn on the host
    from the seed alone: the same on every device and after a resume. None for width 0."""
    if width == 0:
        return None
    return torch.randn(dim, width, generator=torch.Generator().manual_seed(seed + 3)).to(device)


# ----------------------------------------------------------------------------------------------------------
# Several processes (torchrun): data parallelism with every rank holding the same state


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's; world 1 is a plain run, and then nothing below communicates.

    Every rank computes the same global batch (order and augmentation from the same seeded generators) and
    trains on its slice; the trained parameters' gradients are summed after each rank weighs its loss by its
    slice's share, so every rank takes the step a single process would take on the whole batch.
    """

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, t: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch (or of any index list)."""
        return t if self.world == 1 else t.tensor_split(self.world)[self.rank]

    def sum_(self, *tensors: Tensor) -> None:
        """All-reduce (sum) in place, on every rank."""
        if self.world > 1:
            for t in tensors:
                torch.distributed.all_reduce(t)

    def sum_gradients_(self, params: Sequence[nn.Parameter]) -> None:
        if self.world > 1:
            self.sum_(*(p.grad for p in params if p.grad is not None))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


SINGLE = Ranks()


def resolve_device(name: str) -> torch.device:
    """--device as the device this process trains on, a CUDA device always with its index.

    auto: CUDA when available, else the CPU. cuda (or auto on a GPU machine): under torchrun the GPU of this
    process's LOCAL_RANK, else the current CUDA device (0 unless the process chose another). cuda:N: as given,
    except under torchrun with several processes, where each rank takes the GPU of its LOCAL_RANK. An unindexed
    torch.device("cuda") never leaves this function: torch.cuda.set_device and reset_peak_memory_stats need the
    index (torch 2.11 raises on "cuda").
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if "LOCAL_RANK" in os.environ and (device.index is None or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def init_ranks(device: str) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): NCCL on CUDA, each rank on the GPU
    of its LOCAL_RANK; gloo on CPUs. Returns the ranks and the device this process trains on (resolve_device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = resolve_device(device)
    if world == 1:
        return SINGLE, target
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size()), target


# ----------------------------------------------------------------------------------------------------------
# Data (the readers are in data.py), augmentation and the batches the loop serves


def load_data(args: CLArgs, img_size: int, device: torch.device) -> SplitData:
    if args.dataset == "synthetic":
        raw = make_synthetic(args.seed, args.train_per_class or 100)
    elif args.dataset == "folder":
        raw = read_image_folder(Path(args.data_root), img_size)
    elif args.dataset == "fashion-mnist":
        raw = load_fashion_mnist(args.data_root)
    else:
        raw = load_cifar100(args.data_root)
    n = len(raw["class_names"])
    valid = domain_task_counts(n, args.domains)
    if args.tasks not in valid and args.tasks != 1:  # 1: the joint baseline, every class at once
        raise UserError(f"--tasks {args.tasks} does not divide the {n} classes of {args.data_root}"
                        + (f" seen in {args.domains} domains into tasks of one domain" if args.domains > 1 else "")
                        + f"; use one of {', '.join(map(str, valid))}.")
    order = class_order(args.class_seed, n)
    if args.domains > 1:  # (joint: one task holding every domain's classes, in the same order)
        raw = with_domains(raw, args.domains, args.train_per_class, args.test_per_class)
        order = domain_class_order(args.class_seed, n, args.domains, n * args.domains // max(args.tasks, args.domains))
    return split_data(raw, order=order, tasks=args.tasks, train_per_class=args.train_per_class,
                      test_per_class=args.test_per_class, device=device)


def crop_flip(x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor, pad: int) -> Tensor:
    """Crop each zero-padded image at its offset (oy, ox) and mirror it where flip is set, in one gather."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = oy[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(W, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(B, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random crop (zero padding of 1/8 of the side: 4 px on CIFAR) and horizontal flip, on the batch's device."""
    B, pad = x.shape[0], max(1, x.shape[-1] // 8)
    oy, ox = torch.randint(0, 2 * pad + 1, (2, B), generator=gen, device=x.device)
    flip = torch.rand(B, generator=gen, device=x.device) < 0.5
    return crop_flip(x, oy, ox, flip, pad)


def to_model_input(x: Tensor, img_size: int, normalize: str) -> Tensor:
    """uint8 (B, 3, s, s) -> float (B, 3, S, S): resized bilinearly to the backbone's input, normalised."""
    x = x.float() / 255
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=img_size, mode="bilinear", align_corners=False)
    mean, std = normalization_tensors(normalize, x.device)
    return (x - mean) / std


_NORMALIZATION_CACHE: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = {}


def normalization_tensors(normalize: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """(mean, std) of shape (1, 3, 1, 1) on `device`, made once per device: a host-to-device copy per batch
    would block the host on every step."""
    key = (normalize, torch.device(device))
    if key not in _NORMALIZATION_CACHE:
        _NORMALIZATION_CACHE[key] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1)
                                          for v in normalization_values(normalize))
    return _NORMALIZATION_CACHE[key]


class TaskBatches:
    """A task's training data as the loop serves it to the model and to the method.

    Iterating gives one epoch: the task's images in a fresh random order, augmented, model-ready (float,
    resized, normalised), with labels local to the task (0..c-1). `classes` is the task's range of global
    class indices; len() is the number of steps per epoch. Under torchrun each rank gets its slice of every
    global batch (Ranks).
    """

    def __init__(self, data: SplitData, task: int, *, batch_size: int, img_size: int, normalize: str,
                 gen: torch.Generator, device_gen: torch.Generator, ranks: Ranks = SINGLE):
        self.data, self.indices, self.classes = data, data.train_indices(task), range(*data.task_range(task))
        self.batch_size, self.img_size, self.normalize = batch_size, img_size, normalize
        self.gen, self.device_gen, self.ranks = gen, device_gen, ranks
        self.shard_weight = 1.0  # this rank's share of the batch just served: weigh its mean loss by it
        normalization_tensors(normalize, data.train_x.device)  # made now, not inside the first training step

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.indices), generator=self.gen)  # on the host: the seeded order is the same
        if self.indices.is_cuda:  # on every device; pinned, its copy to the GPU does not block the host
            order = order.pin_memory().to(self.indices.device, non_blocking=True)
        idx = self.indices[order.to(self.indices.device)]
        for s in range(0, len(idx), self.batch_size):
            b = idx[s:s + self.batch_size]
            x = augment(self.data.train_x[b], self.device_gen)  # the global batch: the generator moves as in 1 rank
            if self.ranks.world > 1:  # this rank's slice
                mine = self.ranks.shard(torch.arange(len(b), device=b.device))
                self.shard_weight = len(mine) / len(b)
                x, b = x[mine], b[mine]
            yield to_model_input(x, self.img_size, self.normalize), self.data.train_y[b] - self.classes.start


# ----------------------------------------------------------------------------------------------------------
# The model a run trains


def backbone_config(args: CLArgs) -> tuple[ViTConfig, dict[str, Tensor] | None, str]:
    """The ViT shape the flags ask for, its weights (None: random) and where they come from, in words."""
    backbone = args.backbone
    if backbone == "auto" and args.weights in ("auto", "random"):
        backbone = "vit_small_cifar" if args.dataset == "synthetic" else "vit_b_16"
    state, source = None, "random initialisation"
    try:
        if is_hub_name(args.weights) and not Path(args.weights).is_file():
            path = hub_weights(args.weights)[0]
            state, source = read_weights_file(path), f"{args.weights} ({path})"
        elif args.weights not in ("auto", "random"):
            state, source = read_weights_file(args.weights), args.weights
        elif args.weights == "auto" and backbone in TORCHVISION_WEIGHTS:
            state = torchvision_weights(backbone)
            source = f"torchvision {TORCHVISION_WEIGHTS[backbone]}.IMAGENET1K_V1"
        if backbone == "auto":  # the shape comes from the file
            cfg = config_from_state_dict(state, img_size=args.img_size or 224, heads=args.heads)
        else:
            cfg = replace(PRESETS[backbone], img_size=args.img_size or PRESETS[backbone].img_size,
                          heads=args.heads or PRESETS[backbone].heads)
    except WeightsError as e:
        raise UserError(f"--weights {args.weights}: {e}" if state is not None else str(e)) from None
    if cfg.img_size % cfg.patch or cfg.dim % cfg.heads:
        raise UserError(f"--img-size {cfg.img_size} must be a multiple of the patch size {cfg.patch}, and "
                        f"--heads {cfg.heads} must divide the width {cfg.dim}.")
    return cfg, state, source


def build_model(cfg: ViTConfig, state: dict[str, Tensor] | None, num_classes: int, weights: str) -> ViT:
    """The backbone with its weights (random: from the global seed) and a fresh head of num_classes rows."""
    model = ViT(cfg, num_classes=num_classes)
    if state is not None:
        try:
            load_backbone_(model, state)
        except WeightsError as e:
            raise UserError(f"--weights {weights}: {e}") from None
    return model


# ----------------------------------------------------------------------------------------------------------
# Metrics: a[t][j] = accuracy (percent) on task j's test classes after training task t


def cl_metrics(acc: Sequence[Sequence[float]], sizes: Sequence[int] | None = None) -> dict:
    """A_t, A_last, A_avg, forgetting and BWT of a T x T lower-triangular accuracy matrix (percent).

    A_t weighs the tasks by their test-set sizes (equal by default), as the accuracy on the whole seen
    test set does. Forgetting_j = max_{j <= l < T-1} a[l][j] - a[T-1][j]; BWT_j = a[T-1][j] - a[j][j].
    """
    T = len(acc)
    sizes = list(sizes) if sizes is not None else [1] * T
    A = [sum(acc[t][j] * sizes[j] for j in range(t + 1)) / sum(sizes[: t + 1]) for t in range(T)]
    old = range(T - 1)
    forgetting = [max(acc[l][j] for l in range(j, T - 1)) - acc[T - 1][j] for j in old]
    bwt = [acc[T - 1][j] - acc[j][j] for j in old]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return {"A_t": A, "A_last": A[-1], "A_avg": mean(A), "forgetting": mean(forgetting), "BWT": mean(bwt)}


def task_logits(model: ViT, x: Tensor, classes: range) -> Tensor:
    """Logits of one task's classes only: the masked cross-entropy's input (old head rows get no gradient)."""
    feats = model.forward_features(x)  # (B, D)
    return F.linear(feats, model.head.weight[classes.start:classes.stop],
                    model.head.bias[classes.start:classes.stop]).float()  # (B, c)


def evaluate(model: ViT, data: SplitData, seen: int, *, batch_size: int, img_size: int, normalize: str,
             amp: bool, ranks: Ranks = SINGLE) -> list[float]:
    """Accuracy (percent) on each seen task's test classes under the model's own head (evaluate_heads): its linear
    head, or any module that maps features to every class's logits (a deployed ridge head, classifier.RidgeHead)."""
    if isinstance(model.head, nn.Linear):
        head = lambda feats, hi: F.linear(feats, model.head.weight[:hi].float(), model.head.bias[:hi].float())
    else:
        head = lambda feats, hi: model.head(feats)[:, :hi]
    return evaluate_heads(model, data, seen, [head], batch_size=batch_size, img_size=img_size, normalize=normalize,
                          amp=amp, ranks=ranks)[0]


@torch.no_grad()
def evaluate_heads(model: ViT, data: SplitData, seen: int, heads: Sequence[Callable[[Tensor, int], Tensor]], *,
                   batch_size: int, img_size: int, normalize: str, amp: bool, ranks: Ranks = SINGLE) -> list[list[float]]:
    """Per head, the accuracy (percent) on each seen task's test classes, predicting among all seen classes (no
    task id). A head maps float32 features (B, D) and the number of seen classes to logits (B, seen classes);
    every head reads the same features, computed once.

    With amp the backbone runs under bf16 autocast (--precision), the heads in float32 (bf16 logits would tie near-equal
    classes, and argmax breaks ties toward the lower index, an older task). Counts stay on the device; under
    torchrun each rank evaluates a slice and the counts are summed.
    """
    model.eval()
    hi = seen * data.classes_per_task
    idx = ranks.shard((data.test_y < hi).nonzero().squeeze(1))  # one host sync per evaluation; a slice per rank
    correct = torch.zeros(len(heads), seen, dtype=torch.int64, device=data.test_y.device)
    sizes = torch.zeros(seen, dtype=torch.int64, device=data.test_y.device)
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        with torch.autocast(data.test_x.device.type, dtype=torch.bfloat16, enabled=amp):
            feats = model.forward_features(to_model_input(data.test_x[b], img_size, normalize))  # (B, D)
        y = data.test_y[b]
        task = y // data.classes_per_task
        for k, head in enumerate(heads):  # no boolean indexing, no bincount: no sync
            correct[k].scatter_add_(0, task, (head(feats.float(), hi).argmax(1) == y).long())
        sizes.scatter_add_(0, task, torch.ones_like(task))
    ranks.sum_(correct, sizes)
    model.train()
    return (100.0 * correct / sizes).tolist()


@torch.no_grad()
def task_features(model: ViT, data: SplitData, task: int, *, batch_size: int, img_size: int, normalize: str,
                  amp: bool) -> tuple[Tensor, Tensor]:
    """Class-token features (N, D) float32 of the task's training images, unaugmented, and their labels (N,)."""
    model.eval()
    idx = data.train_indices(task)
    feats = []
    for s in range(0, len(idx), batch_size):
        with torch.autocast(data.train_x.device.type, dtype=torch.bfloat16, enabled=amp):
            feats.append(model.forward_features(to_model_input(data.train_x[idx[s:s + batch_size]], img_size,
                                                               normalize)).float())
    model.train()
    return torch.cat(feats), data.train_y[idx]


@torch.no_grad()
def task_views(model: ViT, data: SplitData, task: int, views: int, gen: torch.Generator, *, batch_size: int,
               img_size: int, normalize: str, amp: bool) -> Tensor:
    """Class-token features (views, N, D) float32 of `views` augmented views (the training augmentation) of each of
    the task's training images, in task_features' order; the views are a function of the generator's state."""
    model.eval()
    idx = data.train_indices(task)
    out = []
    for _ in range(views):
        feats = []
        for s in range(0, len(idx), batch_size):
            x = to_model_input(augment(data.train_x[idx[s:s + batch_size]], gen), img_size, normalize)
            with torch.autocast(data.train_x.device.type, dtype=torch.bfloat16, enabled=amp):
                feats.append(model.forward_features(x).float())
        out.append(torch.cat(feats))
    model.train()
    return torch.stack(out)


def frozen_copy(model: ViT) -> ViT:
    """The model as it is now, in evaluation mode and without gradients of its own: the backbone before a task."""
    copy = deepcopy(model).eval()
    copy.requires_grad_(False)
    return copy


def adversarial_probe(old_model: ViT, model: ViT, data: SplitData, task: int, before: Tensor, *, batch_size: int,
                      img_size: int, normalize: str, amp: bool) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """ADC's probe for a head (classifier.adversarial_pairs): old classes' means -> the task's images pushed toward
    them through the backbone before the task, as (classes, features before, features after). Means it has pushed
    toward already return the same pairs: heads with equal means share one push."""
    def features(m: ViT) -> Callable[[Tensor], Tensor]:
        def f(x: Tensor) -> Tensor:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                return m.forward_features(x).float()
        return f

    images = data.train_x[data.train_indices(task)]
    pushed: list[tuple[Tensor, tuple[Tensor, Tensor, Tensor]]] = []  # (means, pairs): the pushes are deterministic

    def probe(means: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        for done, pairs in pushed:  # heads whose old means agree (a map and its -mean, any two on the first drift)
            if torch.equal(done, means):
                return pairs
        model.eval()
        try:
            pairs = adversarial_pairs(means, images, lambda x: to_model_input(x, img_size, normalize), before,
                                      features(old_model), features(model), chunk=batch_size)
        finally:
            model.train()
        pushed.append((means.clone(), pairs))
        return pairs
    return probe


def shared_weak_map(before: Tensor | None, after: Tensor, gen: torch.Generator) -> Callable[[str], WeakMap]:
    """SLDC's weakly non-linear map (classifier.weak_map) of the task's features, fitted on the first call and
    returned again after: it depends on the backbone and the generator's state alone, which every head of a run gets
    the same, so a run fits it once a task however many of its heads move their statistics through it;
    weak("sldc-no-mlp") is the map without its MLP, from a generator in the same state. `weak.fitted` holds the
    maps fitted, by drift name."""
    fitted: dict[str, WeakMap] = {}

    def weak(drift: str = "sldc") -> WeakMap:
        if drift not in fitted:
            fitted[drift] = weak_map(before, after, copy_generator(gen), mlp=drift == "sldc")
        return fitted[drift]
    weak.fitted = fitted
    return weak


# ----------------------------------------------------------------------------------------------------------
# What a method plugs into the loop


class Method:
    """A continual-learning method, as the loop drives it. The model is given to __init__; hooks get the rest.

    Per task: begin_task -> per step [penalty -> backward -> after_backward -> optimizer step] -> end_epoch
    after each epoch -> end_task (consolidate). Every hook but begin_task may be left as is.
    """

    def begin_task(self, task: int, batches: TaskBatches) -> list[nn.Parameter | dict]:
        """Prepare the model for `task`; return the parameters to train (or Adam parameter groups, a dict with
        its own "lr" factor as "lr_scale"). len(batches) is steps per epoch."""
        raise NotImplementedError

    def penalty(self, task_loss: Tensor) -> Tensor | None:
        """An extra loss term for this step (task_loss: the step's masked cross-entropy), or None."""
        return None

    def after_backward(self) -> None:
        """Edit gradients before the optimizer step."""

    def end_epoch(self, epoch: int) -> str:
        """Called after each epoch (0-based) of each task; returns a note for the epoch's log line, or ''."""
        return ""

    def end_task(self, task: int, batches: TaskBatches, log: Callable[[str], None]) -> dict:
        """Consolidate after a task (batches: the task's data, for methods that optimise a merge); return what
        results.json should record for the task."""
        return {}

    def stored_tensors(self) -> list[Tensor]:
        """The tensors the method keeps between tasks beyond the backbone and the head."""
        return []

    def summary(self) -> dict:
        """Method state worth recording in results.json."""
        return {}

    def state_dict(self) -> dict:
        """What the method keeps between tasks, for the checkpoint (tensors, lists, numbers only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()'s output, after __init__ on the freshly built model."""


# ----------------------------------------------------------------------------------------------------------
# The training loop


SYNC_CHECK = "CL_SYNC_CHECK"  # set to 1 (bench.py --gpu-check): every host sync inside a step is recorded
HERE = Path(__file__).resolve().parent


COMPILING = "while compiling: "  # a recorded sync's prefix when the compiler, not the step, asked for it
SWITCHING = "at the recorder's own switch: "  # ... when it surfaced at the debug mode's switch, not in a step
NOT_A_STEP = (COMPILING, SWITCHING)


@contextlib.contextmanager
def host_syncs_recorded(sites: dict[str, int], enabled: bool):
    """Inside: count every host sync the CUDA work makes, by call site ("treelora.py:262 sparsify_gradients_ <-
    continual.py:841 train_task"): torch's sync debug mode warns at each one, synchronously, so the Python stack
    at the warning, cut to this project's files, is where it was asked for. A no-op when not enabled."""
    if not enabled:
        yield
        return

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message).lower():
            return shown(message, category, filename, lineno, file, line)
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        frames = [f for f in stack if Path(f.filename).resolve().parent == HERE]
        site = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        if stack and stack[-1] not in frames:  # the call that synchronised, where it is torch's own Python
            site = f"{'/'.join(Path(stack[-1].filename).parts[-2:])}:{stack[-1].lineno} {stack[-1].name} <- {site}"
        site = site or f"{filename}:{lineno}"
        if any(part in f.filename for f in stack for part in ("torch/_dynamo/", "torch/_inductor/")):
            site = f"{COMPILING}{site}"  # the compiler at a first step (its autotuning times kernels), not the step
        elif stack and stack[-1].name == "set_sync_debug_mode":  # measured on an H200: one a run, surfacing at
            site = f"{SWITCHING}{site}"  # the switch back after an epoch's steps, never at a step's own line
        sites[site] = sites.get(site, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


def adam(groups: list[dict], lr: float, device: torch.device) -> torch.optim.Adam:
    """The loop's Adam: fused (one kernel for every trained tensor) on CUDA, where a LoRA step's optimiser is a
    few hundred small tensors and launches, not arithmetic, cost time; PyTorch's default on the CPU."""
    return torch.optim.Adam(groups, lr=lr, fused=True if device.type == "cuda" else None)


def compile_blocks_(model: ViT, mode: str, device: torch.device, backend: str = "inductor",
                    eager_fallback: bool = True) -> str:
    """--compile: torch.compile every transformer block in place, and return the mode used ('off': none).

    auto is default (inductor) on CUDA and off on the CPU, where a short run would spend more time compiling
    than it saves. The blocks share one forward, so one graph serves all of them (parameters are the graph's
    inputs); the methods' hooks stay outside it (penalties, gradient edits, merges) or are attributes of the
    LoRA layers that the compiled code guards on (HAM's importance and unit-norm B, TRM's functional_call), so
    each such change recompiles once rather than going unseen. A part the compiler cannot take runs eagerly
    (eager_fallback; bench.py's levers turn it off, so that a compiler failure is reported rather than timed).
    """
    mode = ("default" if device.type == "cuda" else "off") if mode == "auto" else mode
    if mode == "off":
        return mode
    import torch._dynamo
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # shapes x train/eval x the methods' attributes
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    config.suppress_errors = eager_fallback  # in a run: fall back to eager for what cannot be compiled
    for block in model.blocks:
        block.compile(backend=backend, mode=None if mode == "default" or backend != "inductor" else mode, dynamic=True)
    model.compiled = mode  # step_begin() reads it
    return mode


def step_begin(model: ViT) -> None:
    """Before each training step (and each step of a merge): with CUDA graphs (--compile reduce-overhead), tell
    them a new step begins, so that the last step's graphs are not kept waiting for a backward that never comes."""
    if getattr(model, "compiled", "off") == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def train_task(model: ViT, method: Method, batches: TaskBatches, *, epochs: int, lr: float, head_lr: float, task: int,
               tasks: int, clock: dict, log: Callable[[str], None], amp: bool = False) -> int:
    """Train one task with the masked cross-entropy plus the method's hooks; one log line per epoch.

    Returns the number of parameters trained.
    """
    params = method.begin_task(task, batches)
    if not params:  # a method that trains nothing (the frozen-backbone baselines)
        clock["epochs_done"] += epochs
        log(f"task {task + 1}/{tasks}: nothing to train")
        return 0
    ranks = batches.ranks
    trained = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    head = {id(p) for p in model.head.parameters()}
    groups = [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} if isinstance(g, dict)
              else {"params": [g], "lr": head_lr if id(g) in head else lr} for g in params]
    device = batches.data.train_x.device
    opt = adam(groups, lr, device)
    sync_check = device.type == "cuda" and os.environ.get(SYNC_CHECK) == "1"
    syncs = clock.setdefault("host_syncs", {})  # call site -> count, for results.json
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)  # summed on the device: no per-step host sync
        hits = torch.zeros((), dtype=torch.int64, device=device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step
        seen = 0
        with host_syncs_recorded(syncs, sync_check):  # bench.py --gpu-check: every host sync inside the steps
            for step, (x, y) in enumerate(batches):
                step_begin(model)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = task_logits(model, x, batches.classes)  # (B, c)
                loss = F.cross_entropy(logits, y)
                penalty = method.penalty(loss)
                opt.zero_grad(set_to_none=True)
                total = loss if penalty is None else loss + penalty
                (total if ranks.world == 1 else total * batches.shard_weight).backward()
                ranks.sum_gradients_(trained)  # every rank now holds the whole batch's gradient
                method.after_backward()
                opt.step()
                loss_sum += loss.detach() * len(y)
                hits += (logits.argmax(1) == y).sum()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
                seen += len(y)
        if ranks.world > 1:  # the epoch's totals over every rank's slices
            counts = torch.tensor(float(seen), device=device)
            ranks.sum_(loss_sum, hits, counts)
            seen = int(counts.item())
        mean_loss = loss_sum.item() / seen  # one host sync per epoch
        if not math.isfinite(mean_loss):
            raise UserError(f"the loss became non-finite at task {task + 1}, epoch {epoch + 1}, step "
                            f"{first_bad.item() + 1}; checkpoint.pt keeps the last finished task, and a lower "
                            "--lr may help.")
        note = method.end_epoch(epoch)
        dt = time.perf_counter() - t0
        clock["epochs_done"] += 1
        left = (time.perf_counter() - clock["start"]) / clock["epochs_done"] * (clock["epochs_total"] - clock["epochs_done"])
        log(f"task {task + 1}/{tasks} epoch {epoch + 1}/{epochs}  loss {mean_loss:.4f}  "
            f"train acc {100 * hits.item() / seen:5.1f}%  {seen / dt:7.1f} img/s  left ~{format_seconds(left)}"
            + (f"  {note}" if note else ""))
    return sum(p.numel() for p in trained)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


CHECKPOINT = "checkpoint.pt"
# Every other setting must match the checkpoint's. --batch-size may change so that an out-of-memory run can go
# on with a smaller batch (the result then differs from an uninterrupted run).
FREE_ON_RESUME = ("out", "resume", "data_root", "device", "batch_size", "compile")


def default_out(args: CLArgs, name: str) -> Path:
    """runs/<method>-<dataset>-T<tasks>-seed<seed>-<hash>: different settings never share a folder."""
    fixed = {k: v for k, v in asdict(args).items() if k not in FREE_ON_RESUME}
    digest = hashlib.sha1(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / f"{name}-{args.dataset}-T{args.tasks}-seed{args.seed}-{digest}"


def mutable_state(model: ViT) -> dict[str, Tensor]:
    """What training changes: every LoRA layer (its base weight too: HAM and TRM fold into it) and the head.

    The rest of the backbone is frozen and is rebuilt from its source (seeded init or weights) on resume.
    """
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LoRALinear)) + ("head.",)
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}


BEFORE_FLAG = {"draws": 1}  # runs made before --draws drew once per image; its default is now 10


def load_checkpoint(path: Path, args: CLArgs, name: str, device: torch.device) -> dict:
    """Read a checkpoint with weights_only=True and refuse one made by another method or other settings."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["config"]
    except Exception:
        raise UserError(f"{path} is corrupt or truncated; delete it to start afresh, or choose another --out."
                        ) from None
    if state.get("method") != name:
        raise UserError(f"{path} is a checkpoint of {state.get('method')}, not {name}; choose another --out.")
    # a flag newer than the checkpoint: the behaviour the checkpoint's run had before the flag existed, which is the
    # flag's default unless the default has changed since (BEFORE_FLAG)
    defaults = {**{f.name: f.default for f in fields(args)}, **BEFORE_FLAG}
    for key, value in asdict(args).items():
        made = saved.get(key, defaults[key])
        if key not in FREE_ON_RESUME and made != value:
            raise UserError(f"{path} was made with --{key.replace('_', '-')} {made}, not {value}; "
                            "resume with the same settings or choose another --out.")
    if state["device_type"] != device.type:
        raise UserError(f"{path} was made on {state['device_type']}, not {device.type}; resume on the same kind "
                        "of device.")
    return state


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    out = {"peak_host_rss_bytes": rss}
    if device.type == "cuda":
        out["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)  # tensors only
        out["peak_cuda_reserved_bytes"] = torch.cuda.max_memory_reserved(device)  # what the caching allocator held
    return out


class Interrupted(Exception):
    """Ctrl-C during a run; the message says what was kept."""


# ----------------------------------------------------------------------------------------------------------
# A whole run


def resolve_normalize(args: CLArgs) -> str:
    """--normalize auto: a hub model's mean and std from its config.json, else imagenet; anything else as given."""
    if args.normalize != "auto":
        return args.normalize
    if is_hub_name(args.weights) and not Path(args.weights).is_file():
        try:
            return hub_normalization(hub_weights(args.weights)[1]) or "imagenet"
        except WeightsError as e:
            raise UserError(f"--weights {args.weights}: {e}") from None
    return "imagenet"


def run_continual(args: CLArgs, make_method: Callable[[ViT, CLArgs], Method], name: str) -> dict:
    """Data, backbone, then T tasks of training + consolidation + evaluation, with a checkpoint after each.

    results.json and checkpoint.pt are rewritten atomically after every task, so a crash loses at most the
    task in progress; --resume continues from the checkpoint and ends bit-for-bit where an uninterrupted run
    ends (on the CPU).
    """
    ranks, device = init_ranks(args.device)
    args = replace(args, normalize=resolve_normalize(args))
    out = Path(args.out) if args.out else default_out(args, name)
    args = replace(args, out=str(out))
    ckpt = out / CHECKPOINT
    exists = ckpt.exists()
    ranks.barrier()  # every rank has looked before rank 0 can write one
    if exists and not args.resume:
        raise UserError(f"{out} already holds a checkpoint; pass --resume to continue that run, or choose "
                        "another --out.")
    if args.resume and not exists:
        raise UserError(f"--resume: {out} holds no {CHECKPOINT}; check --out, or drop --resume to start a new run.")
    state = load_checkpoint(ckpt, args, name, device) if args.resume else None
    synthetic = args.dataset == "synthetic"
    log = RunLog(out, "[synthetic data] " if synthetic else "", enabled=ranks.main)
    try:
        return _run(args, make_method, name, out, device, state, log, ranks)
    except UserError as e:
        if log.file is not None or out.is_dir():
            log.write(f"error: {e}")
        raise
    except KeyboardInterrupt:
        done = len(torch.load(ckpt, map_location="cpu", weights_only=True)["accuracy_matrix"]) if ckpt.exists() else 0
        log.write("interrupted")
        raise Interrupted(f"interrupted; {out}/results.json holds the {done} finished task(s): rerun the same "
                          "command with --resume to continue." if done else
                          "interrupted before the first task finished; nothing was kept.") from None


def _run(args: CLArgs, make_method, name: str, out: Path, device: torch.device, state: dict | None,
         log: RunLog, ranks: Ranks) -> dict:
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # docs/deviations.md, deviation 28
        torch.cuda.set_device(device)  # initialises CUDA: reset_peak_memory_stats needs it for an explicit index
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    cfg, state_dict, source = backbone_config(args)  # before the data: a bad weights file fails fast
    data = load_data(args, cfg.img_size, device)
    model = build_model(cfg, state_dict, data.num_classes, args.weights)
    add_lora_(model, args.targets.split(","), args.rank, args.lora_alpha)
    model.to(device)
    method = make_method(model, args)
    compiled = compile_blocks_(model, args.compile, device)
    lambdas = parse_lambdas(args.ridge_lambdas)
    head = Classifier(args.classifier, model.head, args.drift, lambdas=lambdas, draws=args.draws,
                      align_epochs=args.align_epochs,
                      projection=random_projection(args.seed, cfg.dim, args.rp_dim, device)
                      if args.classifier == "ridge" else None)
    beside = {name: Classifier(kind, model.head, drift, own=True, lambdas=lambdas, draws=args.draws,
                               align_epochs=args.align_epochs,
                               projection=random_projection(args.seed, cfg.dim, m, device) if kind == "ridge" else None)
              for name, kind, drift, m in parse_heads(args.compare_heads, args.rp_dim)}
    heads = [head, *beside.values()]

    log(f"{name}: ViT {cfg.dim}-wide, {cfg.depth} blocks, patch {cfg.patch}, {cfg.img_size} px ({source}) on "
        f"{'synthetic data' if args.dataset == 'synthetic' else args.dataset}, {args.tasks} tasks of "
        f"{data.classes_per_task} classes, {len(data.train_y)} training images, device {device}")
    log(f"class order (class seed {args.class_seed}): {data.order}")
    amp = bf16_autocast(args.precision, device)
    log(f"precision: {'bf16 autocast' if amp else 'float32'} on {device.type} (--precision {args.precision}); "
        f"compiled blocks: {compiled} (--compile {args.compile})")
    log(f"config: {json.dumps(asdict(args))}")

    gen, device_gen = run_generators(args.seed, device)
    acc: list[list[float | None]] = []
    beside_acc: dict[str, list[list[float | None]]] = {name: [] for name in beside}
    per_task: list[dict] = []
    trainable, earlier_seconds, train_seconds = 0, 0.0, 0.0
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        method.load_state_dict(state["method_state"])
        head.load_state_dict(state["classifier"])
        for label, h in beside.items():
            h.load_state_dict(state["compare_heads"][label])
        beside_acc = state["compare_heads_accuracy"]
        torch.set_rng_state(state["rng"]["torch"])
        gen.set_state(state["rng"]["batches"])
        device_gen.set_state(state["rng"]["augment"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        acc, per_task, trainable = state["accuracy_matrix"], state["tasks"], state["trainable_params"]
        earlier_seconds, train_seconds = state["wall_seconds"], state["train_seconds"]
        log(f"resumed from {out / CHECKPOINT}: {len(acc)} of {args.tasks} tasks already done")
    domains, classes = domain_task_layout(args.tasks, args.domains)  # --domains: the two axes of the structure
    clock = {"start": time.perf_counter(), "epochs_done": 0, "epochs_total": (args.tasks - len(acc)) * args.epochs,
             "host_syncs": {}}

    def heads_a_last() -> dict[str, float]:
        """A_last of the run's head and of every head beside it, by --compare-heads name."""
        seen = len(acc)
        if not seen:
            return {}
        own = args.classifier + ("" if args.drift == "none" else f"/{args.drift}")
        return {own: cl_metrics([r[:seen] for r in acc])["A_last"],
                **{name: cl_metrics([r[:seen] for r in m])["A_last"] for name, m in beside_acc.items()}}

    def results() -> dict:
        seen, summary = len(acc), method.summary()
        return {
            "method": name, "finished": seen == args.tasks, "synthetic_data": args.dataset == "synthetic",
            "out": str(out), "config": asdict(args), "vit": asdict(cfg), "backbone_weights": source,
            "class_order": data.order, "class_names": data.class_names,
            "metrics": cl_metrics([r[:seen] for r in acc]), "accuracy_matrix": acc,
            "wall_seconds": earlier_seconds + time.perf_counter() - start, "train_seconds": train_seconds,
            "compiled_blocks": compiled,
            **({"host_syncs_in_steps": clock["host_syncs"]} if os.environ.get(SYNC_CHECK) == "1" else {}),
            **peak_memory(device), "trainable_params": trainable,
            "stored_params": sum(t.numel() for t in [*method.stored_tensors(), *head.stored_tensors()]),
            **summary, "tasks": per_task,
            **({"task_domains": domains, "task_classes": classes,
                "structure": structure_measures(domains, summary.get("groups"), per_task, classes)}
               if args.domains > 1 else {}),
            "drift_recovery": drift_recovery(heads_a_last()),  # what each remedy wins back (report.py)
            "heads": {name: {"accuracy_matrix": m, "metrics": cl_metrics([r[:seen] for r in m]),
                             "lambdas": [t["compare_heads"][name].get("lambda") for t in per_task],
                             "stored_params": sum(t.numel() for t in [*method.stored_tensors(),
                                                                      *beside[name].stored_tensors()])}
                      for name, m in beside_acc.items()},
        }

    try:
        for task in range(len(acc), args.tasks):
            t_task = time.perf_counter()
            batches = TaskBatches(data, task, batch_size=args.batch_size, img_size=cfg.img_size,
                                  normalize=args.normalize, gen=gen, device_gen=device_gen, ranks=ranks)
            feature_kw = dict(batch_size=2 * args.batch_size, img_size=cfg.img_size, normalize=args.normalize,
                              amp=amp)
            needs_before = any(h.needs_features_before for h in heads) and task
            before = task_features(model, data, task, **feature_kw)[0] if needs_before else None
            needs_views = task and any(h.needs_views for h in heads)  # LDC's augmented views, before and after
            t1 = time.perf_counter()
            views_before = task_views(model, data, task, LDC_VIEWS, view_generator(args.seed, task, device),
                                      **feature_kw) if needs_views else None
            # the oracle's map (a diagnostic that uses old data): every old task's features before the task
            seen_before = [task_features(model, data, j, **feature_kw)[0] for j in range(task)] if task and any(
                h.needs_seen_before for h in heads) else None
            # ADC pushes images through the backbone as it was before the task: a frozen copy (not training)
            old_model = frozen_copy(model) if needs_before and any(h.needs_backbone_before for h in heads) else None
            copy_seconds = time.perf_counter() - t1  # the views, the oracle map's passes and the copy
            trainable = train_task(model, method, batches, epochs=args.epochs, lr=args.lr,
                                   head_lr=args.head_lr or args.lr, task=task,
                                   tasks=args.tasks, clock=clock, log=log, amp=amp)
            t0 = time.perf_counter()
            info = method.end_task(task, batches, log)
            compare_seconds = copy_seconds  # the heads beside the run's, the oracle's and ADC's passes: not training
            weak = None  # SLDC's map, shared by the heads that move their statistics through it
            if any(h.needs_features for h in heads):  # the head's treatment, the same for every method (classifier.py)
                feats, labels = task_features(model, data, task, **feature_kw)
                t1 = time.perf_counter()
                probe = None if old_model is None else adversarial_probe(old_model, model, data, task, before,
                                                                          **feature_kw)
                views = None if not needs_views else (views_before, task_views(
                    model, data, task, LDC_VIEWS, view_generator(args.seed, task, device), **feature_kw))
                seen = None
                if any(h.needs_seen_features for h in heads):  # the oracle: every seen task under today's backbone
                    seen = [(*task_features(model, data, j, **feature_kw), range(*data.task_range(j)))
                            for j in range(task)] + [(feats, labels, batches.classes)]
                # the heads beside the run's first: they start from the new classes' rows as trained, which the run's
                # head (writing into the model's head) is about to rewrite
                passes = time.perf_counter() - t1  # the probe's, the views' and the oracle's passes
                t1 = time.perf_counter()
                weak = None if not task else shared_weak_map(before, feats, head_generator(args.seed, task, device))
                for h in beside.values():
                    h.end_task_(feats, labels, batches.classes, head_generator(args.seed, task, device), before, seen,
                                probe, views, weak, seen_before)
                compare_seconds += time.perf_counter() - t1 + (0.0 if head.needs_seen_features else passes)
                head.end_task_(feats, labels, batches.classes, head_generator(args.seed, task, device), before, seen,
                               probe, views, weak, seen_before)
            if head.lam is not None:
                info["ridge_lambda"] = head.lam
            if weak is not None and weak.fitted:  # SLDC's mixture: the weights of the identity, the linear map, the MLP
                info["sldc_mixture"] = {k: [round(a, 4) for a in m.mixture().tolist()] for k, m in weak.fitted.items()}
            if head.map_ridge is not None:  # the drift map's ridge its held-out error chose (linear-cv, -cls, adc-linear)
                info["map_ridge"] = head.map_ridge
            if beside:
                info["compare_heads"] = {name: {k: v for k, v in (("lambda", h.lam), ("map_ridge", h.map_ridge))
                                                if v is not None} for name, h in beside.items()}
                info["compare_heads_seconds"] = compare_seconds
            info["consolidate_seconds"] = time.perf_counter() - t0 - (compare_seconds - copy_seconds)  # copy: before t0
            train_seconds += time.perf_counter() - t_task - compare_seconds  # training and consolidation only
            stored = [*method.stored_tensors(), *head.stored_tensors()]
            info["stored_tensors"], info["stored_params"] = len(stored), sum(t.numel() for t in stored)
            per_task.append(info)
            row, *beside_rows = evaluate_heads(model, data, task + 1, [h.logits for h in heads],
                                               batch_size=2 * args.batch_size, img_size=cfg.img_size,
                                               normalize=args.normalize, amp=amp, ranks=ranks)
            acc.append(row + [None] * (args.tasks - task - 1))
            for label, r in zip(beside, beside_rows):
                beside_acc[label].append(r + [None] * (args.tasks - task - 1))
            A_t = cl_metrics([r[: task + 1] for r in acc])["A_t"][-1]
            others = "".join(f", {name} {cl_metrics([r[: task + 1] for r in m])['A_t'][-1]:.2f}%"
                             for name, m in beside_acc.items())
            log(f"task {task + 1}/{args.tasks} done: A_t {A_t:.2f}%  per task [{', '.join(f'{a:.1f}' for a in row)}]"
                + (f"  (beside it: A_t{others[1:]})" if beside else ""))
            rng = {"torch": torch.get_rng_state(), "batches": gen.get_state(), "augment": device_gen.get_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            checkpoint = {
                "method": name, "config": asdict(args), "device_type": device.type,
                "model": mutable_state(model), "method_state": method.state_dict(),
                "classifier": head.state_dict(), "rng": rng,
                "compare_heads": {name: h.state_dict() for name, h in beside.items()},
                "compare_heads_accuracy": beside_acc,
                "accuracy_matrix": acc, "tasks": per_task, "trainable_params": trainable,
                "wall_seconds": earlier_seconds + time.perf_counter() - start, "train_seconds": train_seconds}
            if ranks.main:  # every rank holds the same state; one writes it
                write_atomic(out / CHECKPOINT, lambda f: torch.save(checkpoint, f), mode="wb")
                write_atomic(out / "results.json", lambda f: f.write(readable_json(results())))
            ranks.barrier()
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"the GPU ran out of memory at --batch-size {args.batch_size}; try --batch-size "
                        f"{max(1, args.batch_size // 2)} with --resume.") from None
    final = results()
    if ranks.main:
        write_atomic(out / "results.json", lambda f: f.write(readable_json(final)))
    m = final["metrics"]
    log(f"done in {format_seconds(final['wall_seconds'])}: A_last {m['A_last']:.2f}%  A_avg {m['A_avg']:.2f}%  "
        f"forgetting {m['forgetting']:.2f}  BWT {m['BWT']:.2f}  -> {out / 'results.json'}")
    for line in describe_structure(final.get("structure", {})):
        log(line)
    for line in describe_drift_recovery(heads_a_last(), final["drift_recovery"]):
        log(line)
    if ranks.main:
        for line in draw(final, out):
            log(line)
    return final


def main_guard(main: Callable[[], object]) -> None:
    """Run a script's main: user errors become one sentence and exit code 1, never a traceback."""
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun rank 0 alone says what went wrong
    try:
        main()
    except UserError as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted before the run started; nothing was written.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # python continual.py RUN_FOLDER...: redraw a finished (or partial) run's pictures
    parser = argparse.ArgumentParser(description="Draw accuracy.png and mechanism.png again from the results.json "
                                                 "of each run folder given.")
    parser.add_argument("folders", nargs="+", type=Path, help="run folders holding a results.json")
    for folder in parser.parse_args().folders:
        if not (folder / "results.json").is_file():
            parser.error(f"{folder} holds no results.json; give a run folder.")
        print("\n".join(redraw(folder)) or f"{folder}: nothing to draw")
