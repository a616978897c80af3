"""HAM: Hierarchical Adapter Merging for scalable continual learning, on a LoRA-ViT.

Paper: https://arxiv.org/abs/2509.13211 (no public code; parts below are reconstructed, see README).

The method in five lines:
  1. Each task t trains a fresh LoRA adapter tau_t and one importance scalar alpha_t.
  2. The task's delta alpha_t * tau_t is pruned to its largest-magnitude entries and rescaled to keep its norm.
  3. It joins the most similar of at most G groups (mean layer-wise cosine), or opens a new group.
  4. Inside a group, members merge by an importance-weighted mean; across groups the deltas add.
  5. Everything folds into the frozen weights, so inference costs exactly the backbone.

This file is also the base of the project: the ViT, the LoRA layer, Split CIFAR-100, the continual-learning
loop and the metrics live here; treelora.py and trm.py import them.

Run:  python ham.py --tasks 20                      (GPU: CIFAR-100 and ViT-B/16 ImageNet weights)
      python ham.py --dataset synthetic --backbone vit_small_cifar --epochs 1   (CPU, offline)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 100  # CIFAR-100
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ViT_B_16_Weights transforms
IMAGENET_STD = (0.229, 0.224, 0.225)
TARGETS = ("qkv", "proj", "fc1", "fc2")  # linear layers of a block that can carry LoRA


class UserError(Exception):
    """A problem the user can fix; the scripts print it as one sentence and exit 1, no traceback."""


# ----------------------------------------------------------------------------------------------------------
# Command line: a dataclass whose field help strings become --help (cleanrl style, without extra packages)


def arg(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class CLArgs:
    """The shared continual-learning protocol (PAPERS.md, 'Shared protocol'); every script has these flags."""

    tasks: int = arg(10, "number of tasks T; must divide 100")
    dataset: str = arg("cifar100", "cifar100, or synthetic (offline, CIFAR-shaped, for CPU runs and tests)",
                       choices=("cifar100", "synthetic"))
    data_root: str = arg("./data", "folder holding cifar-100-python/ (downloaded there when absent)")
    train_per_class: int = arg(0, "use only the first N training images of each class (0: all)")
    class_seed: int = arg(1993, "seed of the class order numpy.random.RandomState(seed).permutation(100)")
    seed: int = arg(0, "seed of everything else (initialisation, batches, augmentation, synthetic data)")
    backbone: str = arg("auto", "ViT configuration: vit_b_16, vit_small_cifar (CPU runs), vit_nano (tests), or "
                                "auto (vit_b_16 on cifar100, vit_small_cifar on synthetic data, so it runs offline)",
                        choices=("auto", "vit_b_16", "vit_small_cifar", "vit_nano"))
    weights: str = arg("auto", "backbone weights: auto (ImageNet for vit_b_16, random for the small ones), "
                               "random, or the path of a timm-format state dict")
    targets: str = arg("qkv", f"comma-separated block layers that get LoRA, from {', '.join(TARGETS)}")
    rank: int = arg(8, "LoRA rank r")
    lora_alpha: float = arg(8.0, "LoRA scale numerator: delta = (lora_alpha / r) B A")
    epochs: int = arg(20, "epochs per task")
    batch_size: int = arg(192, "training batch size")
    lr: float = arg(5e-3, "Adam learning rate (constant)")
    device: str = arg("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    out: str = arg("", "run folder for results.json, log.txt and checkpoint.pt (default: runs/<method>)")
    resume: bool = arg(False, "continue the run in --out from its last finished task (same settings required)")

    def __post_init__(self):
        if self.backbone == "auto":
            self.backbone = "vit_b_16" if self.dataset == "cifar100" else "vit_small_cifar"

    def problem(self) -> str | None:
        """The first invalid setting, as one sentence, or None."""
        divisors = [d for d in range(2, NUM_CLASSES + 1) if NUM_CLASSES % d == 0]
        if self.tasks not in divisors:
            return f"--tasks must divide 100 into at least 2 tasks; use one of {', '.join(map(str, divisors))}."
        targets = self.targets.split(",")
        if not self.targets or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets):
            return f"--targets must be a comma-separated list of distinct names from {', '.join(TARGETS)}."
        for name, low in (("rank", 1), ("epochs", 1), ("batch_size", 1), ("train_per_class", 0)):
            if getattr(self, name) < low:
                return f"--{name.replace('_', '-')} must be at least {low}."
        for name in ("lr", "lora_alpha"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                return f"--{name.replace('_', '-')} must be a positive number."
        if self.weights not in ("auto", "random") and not Path(self.weights).is_file():
            return f"--weights {self.weights}: no such file; give auto, random or the path of a state dict."
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except RuntimeError:
                return f"--device {self.device} is not a device; use auto, cpu or cuda."
            if device.type == "cuda" and (not torch.cuda.is_available()
                                          or (device.index or 0) >= torch.cuda.device_count()):
                return f"--device {self.device}: no such CUDA device here; use --device cpu."
            if device.type not in ("cpu", "cuda"):
                return f"--device {self.device} is not supported; use auto, cpu or cuda."
        if self.out and not _writable(Path(self.out)):
            return f"--out {self.out} cannot be written; choose a folder you can write to."
        if (self.dataset == "cifar100" and not (Path(self.data_root) / "cifar-100-python").is_dir()
                and not _writable(Path(self.data_root))):
            return f"--data-root {self.data_root} holds no cifar-100-python/ and cannot be written to download it."
        return None


def _writable(path: Path) -> bool:
    """Whether `path` is, or could be created as, a folder we can write to."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the module docstring as written and every flag's default."""


def parse_args(cls: type, argv: Sequence[str] | None = None, description: str = "") -> CLArgs:
    """Build argparse from a dataclass's fields, parse, then validate every flag before any work starts."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    for f in fields(cls):
        kw = {"default": f.default, "help": f.metadata["help"]}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    args = cls(**vars(parser.parse_args(argv)))
    problem = args.problem()
    if problem:
        parser.error(problem)  # prints usage and the sentence, exits 2
    return args


def seed_everything(seed: int) -> None:
    """The one place where global seeds are set; data order and augmentation use their own generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------
# HAM: pure functions on tensors (PAPERS.md, HAM reference design)


def prune_by_magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep the ceil(density * n) entries of largest magnitude, zero the rest (step 2, 'prune')."""
    if density >= 1.0:
        return delta.clone()
    flat = delta.flatten()
    k = math.ceil(density * flat.numel())
    kept = flat.abs().topk(k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[kept] = flat[kept]
    return out.view_as(delta)


def rescale_to_norm(pruned: Tensor, reference: Tensor) -> Tensor:
    """Scale `pruned` so that its Frobenius norm equals `reference`'s (step 2, 'scale')."""
    # reconstructed: the abstract says 'pruned, scaled'; we read 'scaled' as restoring the unpruned norm.
    norm = pruned.norm()
    return pruned * (reference.norm() / norm) if norm > 0 else pruned.clone()


def mean_cosine(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> float:
    """Mean over layers of cos(x^l, y^l), each layer's delta flattened (step 3)."""
    cos = [F.cosine_similarity(x.flatten().float(), y.flatten().float(), dim=0) for x, y in zip(xs, ys)]
    return torch.stack(cos).mean().item()


def choose_group(similarities: Sequence[float], *, max_groups: int, threshold: float, tasks_left: int) -> int:
    """Index of the group a new task joins; len(similarities) means 'open a new group' (step 3).

    A new group opens while fewer than max_groups exist and either no group is similar enough
    (best cosine < threshold) or there is a free group for every task still to come (tasks_left counts
    the current one), so that max_groups = T means no merging at all.
    """
    # reconstructed: the free-slot clause makes PAPERS.md's 'G_max = T is the no-merging ablation' hold.
    n = len(similarities)
    if n < max_groups and (n == 0 or max(similarities) < threshold or max_groups - n >= tasks_left):
        return n
    return max(range(n), key=lambda g: similarities[g])


def weighted_mean(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Batch formula of step 4: sum_i w_i p_i / sum_i w_i."""
    return sum(w * d for w, d in zip(weights, deltas)) / sum(weights)


# reconstructed: the weights w_i = |alpha_i| and the running-accumulator form are our reading of 'merge'.
class GroupMerge:
    """Running accumulators of one group (step 4): nothing per member is stored.

    mean: delta = sum_i w_i p_i / sum_i w_i, with w_i = |alpha_i|;  sum: delta = sum_i p_i (task arithmetic).
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.members: list[int] = []
        self.weighted_sum: list[Tensor] = []  # one (d, k) tensor per LoRA layer
        self.weight = 0.0

    def add_(self, task: int, deltas: Sequence[Tensor], importance: float) -> None:
        w = abs(importance) if self.mode == "mean" else 1.0
        if not self.members:
            self.weighted_sum = [torch.zeros_like(d, dtype=torch.float32) for d in deltas]
        for acc, d in zip(self.weighted_sum, deltas):
            acc.add_(d.float(), alpha=w)
        self.weight += w
        self.members.append(task)

    def delta(self) -> list[Tensor]:
        if self.mode == "sum":
            return list(self.weighted_sum)
        return [acc / self.weight for acc in self.weighted_sum]


# ----------------------------------------------------------------------------------------------------------
# Modules: LoRA layer and a timm-named ViT


class LoRALinear(nn.Module):
    """y = W0 x + b + g * (lora_alpha / r) * B A x, with A (r, k) Kaiming-uniform and B (d, r) zero.

    The base linear is frozen. `importance` (g) is an optional scalar parameter that a method may attach
    (HAM's alpha_t); without it g = 1. `fold_()` moves the adapter into the base weight explicitly.
    """

    def __init__(self, base: nn.Linear, rank: int, lora_alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scale = lora_alpha / rank
        d, k = base.weight.shape
        self.A = nn.Parameter(torch.empty(rank, k, device=base.weight.device))
        self.B = nn.Parameter(torch.empty(d, rank, device=base.weight.device))
        self.register_parameter("importance", None)
        self.reset_adapter_()

    @torch.no_grad()
    def reset_adapter_(self) -> None:
        """A fresh adapter: A Kaiming-uniform, B = 0, so the layer equals its base."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B.zero_()

    def delta(self) -> Tensor:
        """The adapter's weight update g * (lora_alpha / r) B A, shape (d, k)."""
        d = self.scale * (self.B @ self.A)
        return d if self.importance is None else self.importance * d

    @torch.no_grad()
    def fold_(self) -> None:
        """W0 <- W0 + delta, then B <- 0: same outputs, adapter emptied."""
        self.base.weight.add_(self.delta().to(self.base.weight.dtype))
        self.B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        lora = F.linear(F.linear(x, self.A), self.B) * self.scale  # (..., r) then (..., d)
        if self.importance is not None:
            lora = lora * self.importance
        return self.base(x) + lora


@dataclass(frozen=True)
class ViTConfig:
    img_size: int
    patch: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int


BACKBONES = {
    "vit_b_16": ViTConfig(img_size=224, patch=16, dim=768, depth=12, heads=12, mlp_dim=3072),
    "vit_small_cifar": ViTConfig(img_size=32, patch=4, dim=192, depth=6, heads=3, mlp_dim=768),
    "vit_nano": ViTConfig(img_size=32, patch=8, dim=48, depth=2, heads=2, mlp_dim=96),
}


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-norm ViT with a class token, timm parameter names, LayerNorm eps 1e-6 (as torchvision's ViT)."""

    def __init__(self, cfg: ViTConfig, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (cfg.img_size // cfg.patch) ** 2 + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, 3, S, S), normalised -> class-token features (B, D)."""
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, N+1, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))  # (B, num_classes)


def timm_names_from_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision VisionTransformer state dict to this file's (timm's) parameter names."""
    fixed = {"conv_proj.weight": "patch_embed.proj.weight", "conv_proj.bias": "patch_embed.proj.bias",
             "class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
             "encoder.ln.weight": "norm.weight", "encoder.ln.bias": "norm.bias",
             "heads.head.weight": "head.weight", "heads.head.bias": "head.bias"}
    in_block = {"ln_1": "norm1", "self_attention.in_proj_weight": "attn.qkv.weight",
                "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj",
                "ln_2": "norm2", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    out = {}
    for name, value in state.items():
        if name in fixed:
            out[fixed[name]] = value
            continue
        prefix = "encoder.layers.encoder_layer_"
        if not name.startswith(prefix):
            raise KeyError(f"unexpected torchvision parameter {name}")
        index, rest = name[len(prefix):].split(".", 1)
        for old, new in in_block.items():
            if rest.startswith(old):
                out[f"blocks.{index}.{new}{rest[len(old):]}"] = value
                break
        else:
            raise KeyError(f"unexpected torchvision parameter {name}")
    return out


def load_backbone_weights_(model: ViT, weights: str, backbone: str) -> str:
    """Fill `model` (before LoRA is added) with the requested weights; returns a description for the log.

    The classifier head is never loaded: the continual learner starts with a fresh 100-class head.
    """
    if weights == "random" or (weights == "auto" and backbone != "vit_b_16"):
        return "random initialisation"
    if weights == "auto":
        import torchvision
        try:
            tv = torchvision.models.vit_b_16(weights=torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1)
        except Exception as e:  # any network or cache failure
            raise UserError("could not download torchvision's ViT-B/16 ImageNet weights "
                            f"({type(e).__name__}); pass --weights PATH with a timm-format state dict, or "
                            "use --backbone vit_small_cifar or vit_nano with random weights.") from None
        state, source = timm_names_from_torchvision(tv.state_dict()), "torchvision ViT_B_16_Weights.IMAGENET1K_V1"
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--weights {weights} is not a readable state dict ({type(e).__name__}).") from None
        source = weights
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    for name, tensor in own.items():
        if name.startswith("head."):
            continue
        if name not in state:
            raise UserError(f"weights from {source} lack {name}; they do not fit the {backbone} backbone.")
        if state[name].shape != tensor.shape:
            raise UserError(f"weights from {source} give {name} the shape {tuple(state[name].shape)}, "
                            f"but {backbone} needs {tuple(tensor.shape)}.")
    model.load_state_dict(state, strict=False)
    return source


def add_lora_(model: ViT, targets: Sequence[str], rank: int, lora_alpha: float) -> list[LoRALinear]:
    """Freeze the backbone, wrap every target linear in a LoRALinear, keep the head trainable."""
    model.requires_grad_(False)
    layers = []
    for block in model.blocks:
        for name in targets:
            parent = block.attn if name in ("qkv", "proj") else block.mlp
            layer = LoRALinear(getattr(parent, name), rank, lora_alpha)
            setattr(parent, name, layer)
            layers.append(layer)
    model.head.requires_grad_(True)
    return layers


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(layers: Sequence[LoRALinear]) -> list[nn.Parameter]:
    """The trainable factors A and B of every layer, in layer order."""
    return [p for layer in layers for p in (layer.A, layer.B)]


def strip_lora_(model: ViT) -> ViT:
    """Replace every LoRALinear by its base linear (call after folding): the plain backbone's cost."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.base)
    return model


# ----------------------------------------------------------------------------------------------------------
# Data: Split CIFAR-100 (original python pickles) and an offline synthetic stand-in


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-100's python files hold: dicts, lists, bytes and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; avoid the deprecated alias
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} asks to load {e}, which a CIFAR-100 file never does; "
                        "refusing to unpickle it (tampered or wrong file).") from None
    except (EOFError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a readable CIFAR-100 python file ({e}).") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR-100 python file (no dictionary inside).")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar100(folder: Path) -> dict:
    """cifar-100-python/{train,test,meta} -> uint8 images (N, 3, 32, 32), int64 fine labels, class names."""
    out = {}
    for split in ("train", "test"):
        d = read_cifar_pickle(folder / split)
        data, labels = d.get("data"), d.get("fine_labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(f"{folder / split} has no uint8 'data' array of shape (N, 3072).")
        if not isinstance(labels, list) or len(labels) != len(data) or not all(
                isinstance(y, int) and 0 <= y < NUM_CLASSES for y in labels):
            raise UserError(f"{folder / split} has no 'fine_labels' list of N labels in 0..99.")
        out[f"{split}_x"] = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        out[f"{split}_y"] = torch.tensor(labels, dtype=torch.int64)
    names = read_cifar_pickle(folder / "meta").get("fine_label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise UserError(f"{folder / 'meta'} has no list of 100 'fine_label_names'.")
    out["class_names"] = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return out


def load_cifar100(root: str) -> dict:
    """Read the original pickles under root, downloading them through torchvision when absent."""
    folder = Path(root) / "cifar-100-python"
    if not all((folder / f).is_file() for f in ("train", "test", "meta")):
        import torchvision
        try:
            torchvision.datasets.CIFAR100(root, train=True, download=True)
        except Exception as e:
            raise UserError(f"CIFAR-100 is not under --data-root {root} and could not be downloaded "
                            f"({type(e).__name__}); put cifar-100-python/ there or use --dataset synthetic.") from None
    return read_cifar100(folder)


def make_synthetic(seed: int, train_per_class: int = 100, test_per_class: int = 20) -> dict:
    """A learnable, CIFAR-shaped offline dataset: 100 classes in 20 coarse groups of 5.

    Class c's prototype is its coarse group's low-frequency pattern plus its own finer pattern, so classes of
    a group look alike (as CIFAR-100's superclasses do); samples add a random shift, contrast and noise.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(20, 3, 4, 4, generator=g)  # one pattern per coarse group
    fine = torch.rand(NUM_CLASSES, 3, 8, 8, generator=g)
    up = lambda t: F.interpolate(t, size=32, mode="bilinear", align_corners=False)
    protos = 0.55 * up(coarse)[torch.arange(NUM_CLASSES) // 5] + 0.45 * up(fine)  # (100, 3, 32, 32)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(NUM_CLASSES).repeat_interleave(n)
        shift = torch.randint(-2, 3, (2,), generator=g)
        x = protos[y].roll(shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        x = x * (0.8 + 0.4 * torch.rand(len(y), 1, 1, 1, generator=g))
        x = x + 0.12 * torch.randn(x.shape, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    (train_x, train_y), (test_x, test_y) = sample(train_per_class), sample(test_per_class)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
            "class_names": [f"synthetic_{c}" for c in range(NUM_CLASSES)]}


def class_order(class_seed: int) -> list[int]:
    """PyCIL/PILOT convention; seed 1993 begins 68, 56, 78, 8, 23, 84, 90, 65, 74, 76."""
    return np.random.RandomState(class_seed).permutation(NUM_CLASSES).tolist()


@dataclass
class SplitData:
    """Images stay uint8 on the training device; labels are relabelled so task t owns [t*c, (t+1)*c)."""

    train_x: Tensor  # (N, 3, 32, 32) uint8
    train_y: Tensor  # (N,) int64, position of the class in the class order
    test_x: Tensor
    test_y: Tensor
    classes_per_task: int
    order: list[int]
    class_names: list[str]

    def task_range(self, task: int) -> tuple[int, int]:
        return task * self.classes_per_task, (task + 1) * self.classes_per_task

    def train_indices(self, task: int) -> Tensor:
        lo, hi = self.task_range(task)
        return ((self.train_y >= lo) & (self.train_y < hi)).nonzero().squeeze(1)


def split_data(raw: dict, *, order: list[int], tasks: int, train_per_class: int, device: torch.device) -> SplitData:
    relabel = torch.empty(NUM_CLASSES, dtype=torch.int64)
    relabel[torch.tensor(order)] = torch.arange(NUM_CLASSES)
    train_x, train_y = raw["train_x"], relabel[raw["train_y"]]
    if train_per_class:
        keep = torch.cat([(train_y == c).nonzero().squeeze(1)[:train_per_class] for c in range(NUM_CLASSES)])
        train_x, train_y = train_x[keep.sort().values], train_y[keep.sort().values]
    return SplitData(train_x.to(device), train_y.to(device), raw["test_x"].to(device),
                     relabel[raw["test_y"]].to(device), NUM_CLASSES // tasks, order,
                     [raw["class_names"][c] for c in order])


def crop_flip(x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor, pad: int) -> Tensor:
    """Crop each zero-padded image at its offset (oy, ox) and mirror it where flip is set, in one gather."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = oy[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(W, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(B, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def augment(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (zero padding `pad`) and horizontal flip of a uint8 batch, on its own device."""
    B = x.shape[0]
    oy, ox = torch.randint(0, 2 * pad + 1, (2, B), generator=gen, device=x.device)
    flip = torch.rand(B, generator=gen, device=x.device) < 0.5
    return crop_flip(x, oy, ox, flip, pad)


def to_model_input(x: Tensor, img_size: int) -> Tensor:
    """uint8 (B, 3, 32, 32) -> float, resized to the backbone's input, ImageNet-normalised."""
    x = x.float() / 255
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=img_size, mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------
# Metrics (PAPERS.md): a[t][j] = accuracy on task j's test classes after training task t


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


# ----------------------------------------------------------------------------------------------------------
# The continual-learning loop, shared by the three methods


class Method:
    """Hooks a continual-learning method plugs into the shared loop; every hook may be left as is."""

    name = "method"

    def begin_task(self, model: ViT, task: int) -> list[nn.Parameter]:
        """Prepare the model for `task`; return the parameters to train."""
        raise NotImplementedError

    def regularizer(self, model: ViT, progress: float) -> Tensor | None:
        """An extra loss term; progress runs over (0, 1] within each epoch."""
        return None

    def after_backward(self, model: ViT) -> None:
        """Edit gradients before the optimizer step."""

    def after_step(self, model: ViT) -> None:
        """Called after each optimizer step."""

    def end_epoch(self, model: ViT, task: int, epoch: int) -> None:
        """Called after each epoch of each task."""

    def end_task(self, model: ViT, task: int, data: SplitData, log: Callable[[str], None]) -> dict:
        """Consolidate after a task; return what the results file should record for it."""
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


class HAM(Method):
    """Hierarchical Adapter Merging (PAPERS.md, HAM reference design, steps 1-5)."""

    name = "ham"

    def __init__(self, model: ViT, *, tasks: int, density: float, groups: int, threshold: float, merge: str):
        self.layers = lora_layers(model)
        self.tasks, self.density, self.max_groups, self.threshold = tasks, density, groups, threshold
        self.merge = merge
        self.w0 = [layer.base.weight.detach().clone() for layer in self.layers]  # frozen W0 per layer
        self.groups: list[GroupMerge] = []
        self.importance: nn.Parameter | None = None

    def begin_task(self, model: ViT, task: int) -> list[nn.Parameter]:
        # Step 1: a fresh adapter and importance scalar alpha_t (init 1); earlier groups are already folded.
        # reconstructed: one alpha_t per task, shared by all its LoRA layers, learned jointly with them.
        self.importance = nn.Parameter(torch.ones((), device=self.w0[0].device))
        for layer in self.layers:
            layer.reset_adapter_()
            layer.importance = self.importance
        return [self.importance, *lora_parameters(self.layers), *model.head.parameters()]

    @torch.no_grad()
    def end_task(self, model: ViT, task: int, data: SplitData, log: Callable[[str], None]) -> dict:
        alpha = self.importance.item()
        full = [layer.delta().float() for layer in self.layers]  # alpha_t * tau_t^l, one (d, k) per layer
        pruned = [rescale_to_norm(prune_by_magnitude(d, self.density), d) for d in full]  # step 2
        sims = [mean_cosine(pruned, g.delta()) for g in self.groups]  # step 3
        g = choose_group(sims, max_groups=self.max_groups, threshold=self.threshold, tasks_left=self.tasks - task)
        opened = g == len(self.groups)
        if opened:
            self.groups.append(GroupMerge(self.merge))
        self.groups[g].add_(task, pruned, alpha)  # step 4, inside the group
        total = [sum(parts) for parts in zip(*(grp.delta() for grp in self.groups))]  # step 4, across groups
        if not all(torch.isfinite(t).all() for t in total):
            raise UserError(f"HAM's merged weights after task {task + 1} are not finite; lower --lr and rerun.")
        # reconstructed: W is recomputed from a kept W0 (no accumulated rounding); the next task trains on it.
        for layer, w0, t in zip(self.layers, self.w0, total):  # step 5: W = W0 + sum_g Delta_g
            layer.base.weight.copy_(w0 + t)
            layer.importance = None
            layer.reset_adapter_()
        log(f"  HAM: alpha={alpha:.3f}  similarities=[{', '.join(f'{s:+.3f}' for s in sims)}]  "
            f"-> group {g}{' (new)' if opened else ''}"
            f"  groups={[grp.members for grp in self.groups]}")
        return {"importance": alpha, "similarities": sims, "group": g}

    def stored_tensors(self) -> list[Tensor]:
        return [*self.w0, *(t for grp in self.groups for t in grp.weighted_sum)]

    def summary(self) -> dict:
        return {"groups": [grp.members for grp in self.groups]}

    def state_dict(self) -> dict:  # W0 is not saved: __init__ reads it from the rebuilt backbone
        return {"groups": [{"members": g.members, "weighted_sum": g.weighted_sum, "weight": g.weight}
                           for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        self.groups = []
        for saved in state["groups"]:
            group = GroupMerge(self.merge)
            group.members, group.weight = list(saved["members"]), saved["weight"]
            group.weighted_sum = [t.to(self.w0[0].device) for t in saved["weighted_sum"]]
            self.groups.append(group)


def batches(data: SplitData, task: int, *, batch_size: int, gen: torch.Generator,
            device_gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of augmented uint8 batches of task `task`, labels local to the task (0..c-1)."""
    idx = data.train_indices(task)
    idx = idx[torch.randperm(len(idx), generator=gen).to(idx.device)]
    lo, _ = data.task_range(task)
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        yield augment(data.train_x[b], device_gen), data.train_y[b] - lo


def task_logits(model: ViT, x: Tensor, data: SplitData, task: int) -> Tensor:
    """Logits of task `task`'s classes only: the masked cross-entropy of PAPERS.md (old head rows get no grad)."""
    lo, hi = data.task_range(task)
    feats = model.forward_features(to_model_input(x, model.cfg.img_size))  # (B, D)
    return F.linear(feats, model.head.weight[lo:hi], model.head.bias[lo:hi]).float()  # (B, c)


@torch.no_grad()
def evaluate(model: ViT, data: SplitData, seen: int, *, batch_size: int, amp: bool) -> list[float]:
    """Accuracy (percent) on each seen task's test classes, predicting among all seen classes."""
    model.eval()
    hi = seen * data.classes_per_task
    idx = (data.test_y < hi).nonzero().squeeze(1)
    correct = torch.zeros(seen, dtype=torch.int64, device=data.test_y.device)
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            feats = model.forward_features(to_model_input(data.test_x[b], model.cfg.img_size))
            logits = F.linear(feats, model.head.weight[:hi], model.head.bias[:hi])
        y = data.test_y[b]
        hit = logits.argmax(1) == y
        correct += torch.bincount(y[hit] // data.classes_per_task, minlength=seen)
    sizes = torch.bincount(data.test_y[idx] // data.classes_per_task, minlength=seen)
    model.train()
    return (100.0 * correct / sizes).tolist()


def train_task(model: ViT, method: Method, data: SplitData, task: int, args: CLArgs, *, gen: torch.Generator,
               device_gen: torch.Generator, clock: dict, log: Callable[[str], None]) -> int:
    """Train one task with the masked cross-entropy plus the method's hooks; one log line per epoch.

    Returns the number of parameters trained.
    """
    params = method.begin_task(model, task)
    opt = torch.optim.Adam(params, lr=args.lr)
    amp = data.train_x.device.type == "cuda"
    steps = math.ceil(len(data.train_indices(task)) / args.batch_size)
    model.train()
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=data.train_x.device)  # summed on the device: no per-step sync
        hits = torch.zeros((), dtype=torch.int64, device=data.train_x.device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=data.train_x.device)  # first non-finite step
        seen = 0
        for step, (x, y) in enumerate(batches(data, task, batch_size=args.batch_size, gen=gen,
                                              device_gen=device_gen)):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = task_logits(model, x, data, task)
            loss = F.cross_entropy(logits, y)
            reg = method.regularizer(model, progress=(step + 1) / steps)
            total = loss if reg is None else loss + reg
            opt.zero_grad(set_to_none=True)
            total.backward()
            method.after_backward(model)
            opt.step()
            method.after_step(model)
            loss_sum += loss.detach() * len(y)
            hits += (logits.argmax(1) == y).sum()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            seen += len(y)
        mean_loss = loss_sum.item() / seen  # one host sync per epoch
        if not math.isfinite(mean_loss):
            raise UserError(f"the loss became non-finite at task {task + 1}, epoch {epoch + 1}, step "
                            f"{first_bad.item() + 1}; checkpoint.pt keeps the last finished task, and a lower "
                            "--lr may help.")
        method.end_epoch(model, task, epoch)
        dt = time.perf_counter() - t0
        clock["epochs_done"] += 1
        left = (time.perf_counter() - clock["start"]) / clock["epochs_done"] * (clock["epochs_total"] - clock["epochs_done"])
        log(f"task {task + 1}/{args.tasks} epoch {epoch + 1}/{args.epochs}  loss {mean_loss:.4f}  "
            f"train acc {100 * hits.item() / seen:5.1f}%  {seen / dt:7.1f} img/s  left ~{format_seconds(left)}")
    return sum(p.numel() for p in params)


def format_seconds(s: float) -> str:
    return f"{s / 3600:.1f}h" if s >= 3600 else f"{s / 60:.1f}m" if s >= 60 else f"{s:.0f}s"


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write to a temporary file in the same folder, flush, then rename: never a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_logger(out: Path, prefix: str) -> Callable[[str], None]:
    """Print a line (flushed) and append it to out/log.txt."""
    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "log.txt", "a")

    def log(line: str) -> None:
        print(prefix + line, flush=True)
        logfile.write(prefix + line + "\n")
        logfile.flush()

    return log


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    out = {"peak_host_rss_bytes": rss}
    if device.type == "cuda":
        out["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


CHECKPOINT = "checkpoint.pt"
# Every other setting must match the checkpoint's. --batch-size may change so that an out-of-memory run can go
# on with a smaller batch (the result then differs from an uninterrupted run).
FREE_ON_RESUME = ("out", "resume", "data_root", "device", "batch_size")


def mutable_state(model: ViT) -> dict[str, Tensor]:
    """What training changes: every LoRA layer (its base weight too: HAM and TRM fold into it) and the head.

    The rest of the backbone is frozen and is rebuilt from its source (seeded init or weights file) on resume.
    """
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LoRALinear)) + ("head.",)
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}


def save_checkpoint_atomic(path: Path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over the old one:
    a crash at any moment leaves either the old or the new checkpoint, never a broken one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, args: CLArgs, name: str, device: torch.device) -> dict:
    """Read a checkpoint with weights_only=True and refuse one made by another method or other settings."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["config"]
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it to start afresh "
                        "or choose another --out.") from None
    if state.get("method") != name:
        raise UserError(f"{path} is a checkpoint of {state.get('method')}, not {name}; choose another --out.")
    for key, value in asdict(args).items():
        if key not in FREE_ON_RESUME and saved.get(key) != value:
            raise UserError(f"{path} was made with --{key.replace('_', '-')} {saved.get(key)}, not {value}; "
                            "resume with the same settings or choose another --out.")
    if state["device_type"] != device.type:
        raise UserError(f"{path} was made on {state['device_type']}, not {device.type}; resume on the same kind "
                        "of device.")
    return state


def run_continual(args: CLArgs, make_method: Callable[[ViT, CLArgs], Method], name: str) -> dict:
    """The whole experiment: data, backbone, T tasks of training + consolidation + evaluation.

    After every task, results.json and checkpoint.pt are rewritten atomically, so a crash loses at most the
    task in progress; --resume continues from the checkpoint and ends bit-for-bit where an uninterrupted run
    ends (on the CPU).
    """
    out = Path(args.out or f"runs/{name}")
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not args.resume:
        raise UserError(f"{out} already holds a checkpoint; pass --resume to continue that run, or choose "
                        "another --out.")
    device = resolve_device(args.device)
    state = load_checkpoint(ckpt, args, name, device) if args.resume and ckpt.exists() else None
    synthetic = args.dataset == "synthetic"
    log = make_logger(out, "[synthetic data] " if synthetic else "")
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()

    order = class_order(args.class_seed)
    raw = make_synthetic(args.seed, args.train_per_class or 100) if synthetic else load_cifar100(args.data_root)
    data = split_data(raw, order=order, tasks=args.tasks, train_per_class=args.train_per_class, device=device)
    model = ViT(BACKBONES[args.backbone])
    source = load_backbone_weights_(model, args.weights, args.backbone)
    add_lora_(model, args.targets.split(","), args.rank, args.lora_alpha)
    model.to(device)
    method = make_method(model, args)

    log(f"{name}: {args.backbone} ({source}) on {'synthetic data' if synthetic else 'CIFAR-100'}, "
        f"{args.tasks} tasks of {data.classes_per_task} classes, {len(data.train_y)} training images, device {device}")
    log(f"class order (class seed {args.class_seed}): {order}")
    log(f"config: {json.dumps(asdict(args))}")

    gen = torch.Generator().manual_seed(args.seed)  # batch order
    device_gen = torch.Generator(device=device).manual_seed(args.seed + 1)  # augmentation
    acc: list[list[float | None]] = []
    per_task: list[dict] = []
    trainable, earlier_seconds, train_seconds = 0, 0.0, 0.0
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        method.load_state_dict(state["method_state"])
        torch.set_rng_state(state["rng"]["torch"])
        gen.set_state(state["rng"]["batches"])
        device_gen.set_state(state["rng"]["augment"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        acc, per_task, trainable = state["accuracy_matrix"], state["tasks"], state["trainable_params"]
        earlier_seconds, train_seconds = state["wall_seconds"], state["train_seconds"]
        log(f"resumed from {ckpt}: {len(acc)} of {args.tasks} tasks already done")
    clock = {"start": time.perf_counter(), "epochs_done": 0, "epochs_total": (args.tasks - len(acc)) * args.epochs}

    def results() -> dict:
        seen = len(acc)
        return {
            "method": name, "finished": seen == args.tasks, "synthetic_data": synthetic,
            "config": asdict(args), "class_order": order, "class_names": data.class_names,
            "backbone_weights": source, "accuracy_matrix": acc,
            "metrics": cl_metrics([r[:seen] for r in acc]),
            "tasks": per_task, "wall_seconds": earlier_seconds + time.perf_counter() - start,
            "train_seconds": train_seconds, **peak_memory(device),
            "trainable_params": trainable,
            "stored_params": sum(t.numel() for t in method.stored_tensors()),
            **method.summary(),
        }

    try:
        for task in range(len(acc), args.tasks):
            t_task = time.perf_counter()
            trainable = train_task(model, method, data, task, args, gen=gen, device_gen=device_gen, clock=clock,
                                   log=log)
            t0 = time.perf_counter()
            info = method.end_task(model, task, data, log)
            info["consolidate_seconds"] = time.perf_counter() - t0
            train_seconds += time.perf_counter() - t_task  # training and consolidation, not evaluation
            stored = method.stored_tensors()
            info["stored_tensors"], info["stored_params"] = len(stored), sum(t.numel() for t in stored)
            per_task.append(info)
            row = evaluate(model, data, task + 1, batch_size=2 * args.batch_size, amp=device.type == "cuda")
            acc.append(row + [None] * (args.tasks - task - 1))
            A_t = cl_metrics([r[: task + 1] for r in acc])["A_t"][-1]
            log(f"task {task + 1}/{args.tasks} done: A_t {A_t:.2f}%  per task [{', '.join(f'{a:.1f}' for a in row)}]")
            rng = {"torch": torch.get_rng_state(), "batches": gen.get_state(), "augment": device_gen.get_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            save_checkpoint_atomic(ckpt, {
                "method": name, "config": asdict(args), "device_type": device.type,
                "model": mutable_state(model), "method_state": method.state_dict(), "rng": rng,
                "accuracy_matrix": acc, "tasks": per_task, "trainable_params": trainable,
                "wall_seconds": earlier_seconds + time.perf_counter() - start, "train_seconds": train_seconds})
            write_json_atomic(out / "results.json", results())
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"the GPU ran out of memory at --batch-size {args.batch_size}; try --batch-size "
                        f"{max(1, args.batch_size // 2)} with --resume.") from None
    final = results()
    write_json_atomic(out / "results.json", final)
    m = final["metrics"]
    log(f"done in {format_seconds(final['wall_seconds'])}: A_last {m['A_last']:.2f}%  A_avg {m['A_avg']:.2f}%  "
        f"forgetting {m['forgetting']:.2f}  BWT {m['BWT']:.2f}  -> {out / 'results.json'}")
    return final


def main_guard(main: Callable[[], object]) -> None:
    """Run a script's main: user errors become one sentence and exit code 1, never a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; results.json holds every finished task.", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------------


@dataclass
class Args(CLArgs):
    """HAM's flags on top of the shared protocol."""

    density: float = arg(0.2, "fraction rho of each task delta's entries kept by magnitude pruning (1: no pruning)")
    groups: int = arg(5, "maximum number of groups G_max (= --tasks: no merging, every task its own group)")
    threshold: float = arg(0.3, "cosine below which a task opens a new group while groups are free")
    merge: str = arg("mean", "inside a group: importance-weighted mean, or sum (task arithmetic)",
                     choices=("mean", "sum"))

    def problem(self) -> str | None:
        if not 0 < self.density <= 1:
            return "--density must be in (0, 1]; 1 disables pruning."
        if self.groups < 1:
            return "--groups must be at least 1."
        if not -1 <= self.threshold <= 1:
            return "--threshold is a cosine similarity and must lie in [-1, 1]."
        return super().problem()


def make_method(model: ViT, args: Args) -> HAM:
    return HAM(model, tasks=args.tasks, density=args.density, groups=args.groups, threshold=args.threshold,
               merge=args.merge)


def main(argv: Sequence[str] | None = None) -> dict:
    return run_continual(parse_args(Args, argv, description=__doc__), make_method, "ham")


if __name__ == "__main__":
    main_guard(main)
