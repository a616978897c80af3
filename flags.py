"""The flags every script shares: a dataclass whose field help strings become --help, and every check a flag
gets before any work starts (each mistake one sentence). Each script's Args adds its method's flags.

    @dataclass
    class Args(CLArgs):
        density: float = arg(0.5, "fraction of entries kept")
    args = parse_args(Args, argv, description=__doc__)     # exits 2 with one sentence on a bad flag
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch

from classifier import ALIGN_EPOCHS, CLASSIFIERS, DRAWS, DRIFT, head_problem
from data import CIFAR_CLASSES, DOMAINS, find_fashion_mnist
from lora_vit import PRESETS, TARGETS, is_hub_name

DATASET_CLASSES = {"cifar100": CIFAR_CLASSES, "fashion-mnist": 10, "synthetic": CIFAR_CLASSES}  # folder: its own
NORMALIZATION = {  # name -> (mean, std) per channel
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's and most timm weights
    "0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # timm's augreg in21k ViTs
}


def normalization_values(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a --normalize value: a NORMALIZATION name or 'r,g,b/r,g,b'; ValueError if neither."""
    if name in NORMALIZATION:
        return NORMALIZATION[name]
    mean, std = (tuple(float(v) for v in part.split(",")) for part in name.split("/"))
    if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
        raise ValueError(name)
    return mean, std
SEED_MAX = 2**32 - 1  # numpy's RandomState takes seeds below 2**32


# ----------------------------------------------------------------------------------------------------------
# Flags: a dataclass whose field help strings become --help (cleanrl's style, without extra packages)


def arg(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


COMPILE_MODES = ("auto", "off", "default", "reduce-overhead")  # --compile


@dataclass
class CLArgs:
    """The shared protocol's flags; each script's Args adds its method's."""

    tasks: int = arg(10, "number of tasks T; must divide the number of classes (100 for CIFAR-100, 10 for "
                         "Fashion-MNIST)")
    dataset: str = arg("cifar100", "cifar100; fashion-mnist; folder (a class-per-folder tree under --data-root "
                                   "with train/ and test/); or synthetic (offline, CIFAR-shaped, for CPU runs and "
                                   "tests)", choices=("cifar100", "fashion-mnist", "folder", "synthetic"))
    data_root: str = arg("./data", "cifar100: the folder holding cifar-100-python/; fashion-mnist: the folder "
                                   "holding its four idx files (gzipped or not; Debian's dataset-fashion-mnist puts "
                                   "them in /usr/share/datasets/fashion-mnist); both are downloaded there when "
                                   "absent; folder: the folder holding train/ and test/")
    domains: int = arg(1, "see every class in D domains (2-4: as is, inverted, rotated 90, rotated 180) as D times "
                          "the classes, each task in one domain, task t in domain t mod D (1: off)")
    train_per_class: int = arg(0, "use only the first N training images of each class (0: all)")
    test_per_class: int = arg(0, "evaluate on only the first N test images of each class (0: all)")
    class_seed: int = arg(1993, "seed of the class order numpy.random.RandomState(seed).permutation(n)")
    seed: int = arg(0, "seed of everything else (initialisation, batches, augmentation, synthetic data)")
    backbone: str = arg("auto", "ViT shape: a preset, or auto (read from a --weights file; else vit_b_16, or "
                                "vit_small_cifar on synthetic data so that it runs offline on a CPU)",
                        choices=("auto", *PRESETS))
    weights: str = arg("auto", "auto (torchvision's ImageNet weights for vit_b_16, vit_b_32 and vit_l_16, random "
                               "for the others), random, or the path of a timm-format ViT state dict")
    img_size: int = arg(0, "input side in pixels (0: the preset's, 224 for a weights file); a file's position "
                           "grid is resampled to it")
    heads: int = arg(0, "attention heads (0: the preset's, or timm's count for a weights file's width)")
    normalize: str = arg("auto", "input normalisation: auto (a hub model's config.json, else imagenet), imagenet "
                                 "mean/std, 0.5 (timm's in21k weights) or r,g,b/r,g,b")
    targets: str = arg("qkv", f"comma-separated block layers that get LoRA, from {', '.join(TARGETS)}")
    rank: int = arg(8, "LoRA rank r")
    lora_alpha: float = arg(8.0, "LoRA scale numerator: delta = (lora_alpha / r) B A")
    epochs: int = arg(20, "epochs per task")
    batch_size: int = arg(192, "training batch size")
    lr: float = arg(1e-4, "Adam learning rate (constant) of the LoRA factors and the method's own parameters")
    head_lr: float = arg(1e-2, "Adam learning rate of the head (0: --lr); a head 100x faster than the backbone is "
                               "SLCA's slow learner")
    classifier: str = arg("ridge", "the head after each task: linear (the masked head as trained; ablation), align "
                                   "(retrained on features sampled from every seen class's Gaussian), ncm (cosine "
                                   "to the class-mean features) or ridge (RanPAC: ridge regression on a random "
                                   "ReLU projection of the features)", choices=CLASSIFIERS)
    drift: str = arg("none", "what moves old classes' statistics when the backbone changes: nothing (none); sdc "
                             "(means follow the drift of each new task's images); linear (a least-squares map of the "
                             "new task's features before to after the task carries them); linear-cv (the same map, "
                             "its ridge chosen by the error on held-out images of the task); linear-cls (its ridge "
                             "chosen by the error on a held-out class of the task); linear-h (ridge: that map fitted on "
                             "the head's inputs h = ReLU(f W), carrying its sums exactly); adc (each old mean moves by the "
                             "drift of the task's images pushed toward it through the backbone before the task); "
                             "adc-linear (the map fitted on the task's and the pushed images); ldc (LDC: a linear "
                             "projector trained by Adam on 20 augmented views of the task's images); linear-views "
                             "(linear-cls's map fitted on those views); adc-views (that map fitted on the images, "
                             "their views and ADC's pushed images together); sldc (SLDC's weakly non-linear map: "
                             "identity, a linear map and an MLP mixed by learned weights; Gaussians move by draws "
                             "through it); sldc-no-mlp (that map without its MLP, the ablation); sldc-linear (SLDC's "
                             "linear operator: a ridge map of unit features shrunk toward the identity); gaussian (a "
                             "diagnostic of the ridge head: its sums rebuilt from old classes' unmoved Gaussians); "
                             "oracle (a diagnostic "
                             "that uses old data: recomputed from every seen class's training images under the "
                             "current backbone); oracle-mean (a diagnostic: the oracle's means, stale "
                             "covariances); oracle-map (a diagnostic: the linear map fitted on old classes' own "
                             "images, the best single map); a map's name with -mean (e.g. linear-cls-mean, ldc-mean): that map moves "
                             "the means only, covariances stale. The ridge head rebuilds its sums from each "
                             "class's moved Gaussian, or with --rp-dim 0 under a map carries them exactly",
                     choices=DRIFT)
    rp_dim: int = arg(2000, "ridge: the random projection's width M (0: the plain ridge head on the features)")
    draws: int = arg(DRAWS, "ridge, when it rebuilds old classes' sums from their Gaussians (every --drift but "
                            "none, oracle and a map under --rp-dim 0): draws per image a class had, weighted to one "
                            "image (one draw's noise costs up to 4.5 points on the domain regime)")
    align_epochs: int = arg(ALIGN_EPOCHS, "align: epochs of the aligned head's retraining on draws from every seen "
                                          "class's Gaussian after each task (SLCA's ca_epochs)")
    ridge_lambdas: str = arg("1e-8:1e8", "ridge: the grid lambda is chosen from after each task, as LO:HI (every "
                                         "power of ten between) or a comma-separated list of positive numbers")
    compare_heads: str = arg("", "heads kept beside --classifier on the same backbone, each with its own "
                                 "statistics, reported in results.json under 'heads' (training is unchanged): a "
                                 "comma-separated list of KIND or KIND/DRIFT, KIND one of linear, align, ncm, ridge "
                                 "(--rp-dim) or ridge0 (M = 0), e.g. ridge,align/oracle,ridge0/linear")
    device: str = arg("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    compile: str = arg("auto", "torch.compile the ViT's blocks: default (inductor), reduce-overhead (inductor with "
                               "CUDA graphs) or off; auto: default on CUDA, off on the CPU (docs/results.md, the GPU "
                               "section, measures each)", choices=COMPILE_MODES)
    precision: str = arg("auto", "the backbone's precision: bf16 autocast (heads, statistics and merges stay float32) "
                                 "or fp32; auto: bf16 on CUDA and on CPUs with bf16 instructions (avx512_bf16, "
                                 "amx_bf16), else fp32", choices=("auto", "fp32", "bf16"))
    out: str = arg("", "run folder for results.json, log.txt, accuracy.png and checkpoint.pt; empty: "
                       "runs/<method>-<dataset>-T<tasks>-seed<seed>-<hash of the other settings>")
    resume: bool = arg(False, "continue the run in --out from its last finished task (same settings required)")

    def problem(self) -> str | None:
        """The first invalid setting, as one sentence, or None."""
        if not 1 <= self.domains <= len(DOMAINS):
            return f"--domains must be between 1 (off) and {len(DOMAINS)}."
        if self.dataset != "folder":
            n = DATASET_CLASSES[self.dataset]
            valid = domain_task_counts(n, self.domains)
            if self.tasks not in valid and self.domains == 1:
                return (f"--tasks must divide the {n} classes of {self.dataset} into at least 2 tasks; use one of "
                        f"{', '.join(map(str, valid))}.")
            if self.tasks not in valid:
                return (f"--tasks with --domains {self.domains} must give each domain the same whole number of tasks "
                        f"of {self.dataset}'s {n} classes; use one of {', '.join(map(str, valid))}.")
        elif self.tasks < 2:
            return "--tasks must be at least 2."
        targets = self.targets.split(",")
        if not self.targets or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets):
            return f"--targets must be a comma-separated list of distinct names from {', '.join(TARGETS)}."
        for name, low in (("rank", 1), ("epochs", 1), ("batch_size", 1), ("train_per_class", 0),
                          ("test_per_class", 0), ("img_size", 0), ("heads", 0)):
            if getattr(self, name) < low:
                return f"--{name.replace('_', '-')} must be at least {low}."
        for name in ("seed", "class_seed"):
            if not 0 <= getattr(self, name) <= SEED_MAX:
                return f"--{name.replace('_', '-')} must be between 0 and {SEED_MAX}."
        for name in ("lr", "lora_alpha"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                return f"--{name.replace('_', '-')} must be a positive number."
        if not self.head_lr >= 0 or not math.isfinite(self.head_lr):
            return "--head-lr must be a non-negative number (0: the same as --lr)."
        if self.rp_dim < 0:
            return "--rp-dim must be at least 0 (0: the plain ridge head without a projection)."
        if self.draws < 1:
            return "--draws must be at least 1 (draws per image a class had)."
        if self.align_epochs < 1:
            return "--align-epochs must be at least 1 (epochs of the aligned head's retraining)."
        try:
            parse_lambdas(self.ridge_lambdas)
        except ValueError as e:
            return f"--ridge-lambdas {self.ridge_lambdas!r}: {e}"
        problem = head_problem(self.classifier, self.drift)
        if problem:
            return f"--classifier {self.classifier} --drift {self.drift}: {problem}."
        try:
            parse_heads(self.compare_heads, self.rp_dim)
        except ValueError as e:
            return f"--compare-heads {self.compare_heads!r}: {e}."
        named = self.weights in ("auto", "random") or is_hub_name(self.weights)
        if not named and not Path(self.weights).is_file():
            return (f"--weights {self.weights}: no such file; give auto, random, the path of a state dict or a hub "
                    "model such as timm/vit_base_patch16_224.augreg_in21k.")
        if self.normalize != "auto":
            try:
                normalization_values(self.normalize)
            except ValueError:
                return (f"--normalize {self.normalize} is not auto, {', '.join(NORMALIZATION)} or three means and "
                        "three positive stds as r,g,b/r,g,b.")
        problem = device_problem(self.device)
        if problem:
            return problem
        if self.out and not _writable(Path(self.out)):
            return f"--out {self.out} cannot be written; choose a folder you can write to."
        if self.dataset == "folder" and not (Path(self.data_root) / "train").is_dir():
            return f"--data-root {self.data_root} holds no train/ folder of class folders."
        if (self.dataset == "cifar100" and not (Path(self.data_root) / "cifar-100-python").is_dir()
                and not _writable(Path(self.data_root))):
            return f"--data-root {self.data_root} holds no cifar-100-python/ and cannot be written to download it."
        if (self.dataset == "fashion-mnist" and find_fashion_mnist(Path(self.data_root)) is None
                and not _writable(Path(self.data_root))):
            return (f"--data-root {self.data_root} holds no Fashion-MNIST idx files and cannot be written to download "
                    "them; Debian's dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist.")
        return None


def domain_task_counts(n: int, domains: int) -> list[int]:
    """Task counts that split n classes seen in `domains` domains into tasks of one domain each, at least 2."""
    return [domains * k for k in range(1, n + 1) if n % k == 0 and domains * k >= 2]


def parse_lambdas(text: str) -> tuple[float, ...]:
    """--ridge-lambdas: 'LO:HI' (every power of ten from LO to HI) or 'a,b,c'; ValueError with the reason."""
    try:
        if ":" in text:
            lo, hi = (math.log10(float(v)) for v in text.split(":"))
            if lo != round(lo) or hi != round(hi):
                raise ValueError
            values = tuple(10.0 ** k for k in range(round(lo), round(hi) + 1))
        else:
            values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError("give LO:HI with powers of ten, such as 1e-8:1e8, or a comma-separated list") from None
    if not values:
        raise ValueError("the grid is empty; give LO:HI with LO <= HI, or at least one number")
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError("every lambda must be a positive number")
    return values


def parse_heads(text: str, rp_dim: int) -> list[tuple[str, str, str, int]]:
    """--compare-heads: [(name, kind, drift, M)]; ValueError with the reason."""
    heads = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        kind, _, drift = name.partition("/")
        drift = drift or "none"
        m = 0 if kind == "ridge0" else rp_dim
        kind = "ridge" if kind == "ridge0" else kind
        problem = head_problem(kind, drift)
        if problem:
            raise ValueError(f"{name}: {problem}")
        if name in (h[0] for h in heads):
            raise ValueError(f"{name} is named twice")
        heads.append((name, kind, drift, m))
    return heads


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (Linux's /proc/cpuinfo flags avx512_bf16 or amx_bf16)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def bf16_autocast(precision: str, device: torch.device) -> bool:
    """--precision: whether the backbone runs under bf16 autocast on `device`."""
    if precision == "auto":
        return device.type == "cuda" or cpu_has_bf16()
    return precision == "bf16"


def device_problem(name: str) -> str | None:
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device {name} is not a device; use auto, cpu or cuda."
    if device.type not in ("cpu", "cuda"):
        return f"--device {name} is not supported; use auto, cpu or cuda."
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        return f"--device {name}: no such CUDA device here; use --device cpu."
    return None


def _writable(path: Path) -> bool:
    """Whether `path` is, or could be created as, a folder we can write to."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows the module docstring as written and every flag's default once."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or \
                action.option_strings == ["-h", "--help"]:  # (0 is a default worth showing: `0 in (False,)` is True)
            return action.help
        return f"{action.help} (default: {action.default if action.default != '' else 'empty'})"


def parse_args(cls: type, argv: Sequence[str] | None = None, description: str = "") -> CLArgs:
    """Build argparse from a dataclass's fields, parse, then validate every flag before any work starts."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    for f in fields(cls):
        kw = {"default": f.default, "help": f.metadata["help"]}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(f.default, bool):
            kw["action"] = "store_true"
        else:
            kw["type"] = type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    args = cls(**vars(parser.parse_args(argv)))
    problem = args.problem()
    if problem:
        if os.environ.get("RANK", "0") != "0":
            sys.exit(2)  # under torchrun rank 0 alone prints the sentence
        parser.error(problem)  # prints usage and the sentence, exits 2
    return args
