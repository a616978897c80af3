"""A Vision Transformer with timm parameter names, LoRA adapters, and weight loading. Torch only.

Read top to bottom: the LoRA layer, the ViT's blocks, the ViT, adding / folding / stripping adapters, then
weights: timm-format files of any size (width, depth and patch read from the tensors, LayerScale folded,
the position grid resampled) and torchvision's ImageNet weights. Nothing here knows about continual learning.

    model = ViT(PRESETS["vit_b_16"])
    load_backbone_(model, torchvision_weights("vit_b_16"))      # or read_weights_file(path)
    layers = add_lora_(model, ["qkv"], rank=8, lora_alpha=8.0)  # frozen backbone, trainable A, B and head
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

TARGETS = ("qkv", "proj", "fc1", "fc2")  # the linear layers of a block that can carry LoRA


class WeightsError(ValueError):
    """A weights file or download that cannot be used; the message is one sentence that says what to do."""


# ----------------------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = W0 x + b + g * (lora_alpha / r) * B A x, with A (r, k) Kaiming-uniform and B (d, r) zero.

    The base linear is frozen. `importance` (g) is an optional scalar parameter a method may attach; without
    it g = 1. With `unit_b` set, B is used at unit Frobenius norm, B / |B|_F, so that g alone carries the
    adapter's scale. Folding the adapter into the base weight is an explicit call, `fold_()`, never a side effect.
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
        self.unit_b = False
        self.reset_adapter_()

    @torch.no_grad()
    def reset_adapter_(self) -> None:
        """A fresh adapter: A Kaiming-uniform, B = 0, so the layer equals its base."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B.zero_()

    def _b(self) -> Tensor:
        return self.B / torch.linalg.matrix_norm(self.B) if self.unit_b else self.B

    def delta(self) -> Tensor:
        """The adapter's weight update g * (lora_alpha / r) B A, shape (d, k)."""
        d = self.scale * (self._b() @ self.A)
        return d if self.importance is None else self.importance * d

    @torch.no_grad()
    def fold_(self) -> None:
        """W0 <- W0 + delta, then B <- 0 (and unit_b off): the same outputs, the adapter emptied."""
        self.base.weight.add_(self.delta().to(self.base.weight.dtype))
        self.B.zero_()
        self.unit_b = False

    def forward(self, x: Tensor) -> Tensor:
        lora = F.linear(F.linear(x, self.A), self._b()) * self.scale  # (..., r) then (..., d)
        if self.importance is not None:
            lora = lora * self.importance
        return self.base(x) + lora


# ----------------------------------------------------------------------------------------------------------
# The ViT (pre-norm, class token, LayerNorm eps 1e-6, exact GELU: torchvision's and timm's ViT)


@dataclass(frozen=True)
class ViTConfig:
    img_size: int  # input side in pixels
    patch: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int

    @property
    def grid(self) -> int:
        return self.img_size // self.patch


PRESETS = {
    "vit_s_16": ViTConfig(img_size=224, patch=16, dim=384, depth=12, heads=6, mlp_dim=1536),
    "vit_s_14": ViTConfig(img_size=224, patch=14, dim=384, depth=12, heads=6, mlp_dim=1536),  # DINOv2-S shape
    "vit_b_16": ViTConfig(img_size=224, patch=16, dim=768, depth=12, heads=12, mlp_dim=3072),
    "vit_b_32": ViTConfig(img_size=224, patch=32, dim=768, depth=12, heads=12, mlp_dim=3072),
    "vit_l_16": ViTConfig(img_size=224, patch=16, dim=1024, depth=24, heads=16, mlp_dim=4096),
    "vit_small_cifar": ViTConfig(img_size=32, patch=4, dim=192, depth=6, heads=3, mlp_dim=768),  # CPU runs
    "vit_nano": ViTConfig(img_size=32, patch=8, dim=48, depth=2, heads=2, mlp_dim=96),  # tests
}
# timm's head counts by width (ViT-Ti, S, B, L, H); any other width needs the head count given explicitly.
TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


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
    """Images (B, 3, S, S) -> logits (B, num_classes), through the class token's final features."""

    def __init__(self, cfg: ViTConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, cfg.dim))
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


# ----------------------------------------------------------------------------------------------------------
# Adding, folding and stripping adapters


def add_lora_(model: ViT, targets: Sequence[str], rank: int, lora_alpha: float) -> list[LoRALinear]:
    """Freeze the backbone, wrap every target linear of every block in a LoRALinear, keep the head trainable."""
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
    """Replace every LoRALinear by its base linear (call after folding): exactly the plain backbone's cost."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.base)
    return model


# ----------------------------------------------------------------------------------------------------------
# Weights: timm-format state dicts of any ViT size, and torchvision's ImageNet weights


WRAPPERS = ("teacher", "state_dict", "model", "module")  # DINO/iBOT (teacher first: their evaluations use it),
# timm's train.py, DeiT/MAE, DDP; the first present that maps names to tensors is the backbone's state dict
PRETRAINING_ONLY = ("mask_token", "masked_embed", "decoder")  # MAE's decoder and mask token, iBOT's masked_embed


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A timm-format state dict from .safetensors, or from .pth/.pt/.bin with torch.load(weights_only=True).

    Neither runs code from the file. Common wrappers (WRAPPERS) are opened and a prefix on every backbone name
    (DDP's module., DINO's backbone., both) is removed, keeping only the names under it; pretraining-only
    tensors (PRETRAINING_ONLY) are dropped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise WeightsError(f"{path} is a safetensors file; install the optional extra with pip install "
                               "safetensors.") from None
        try:
            state = load_file(str(path))
        except Exception as e:
            raise WeightsError(f"{path} is corrupt or truncated, or not a safetensors file ({_cause(e)}).") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            unsafe = "Unsupported global" in str(e)  # a pickled class or function: refused, never run
            raise WeightsError(f"{path} holds Python objects that torch.load(weights_only=True) refuses to run; "
                               "save its state dict alone (torch.save(model.state_dict(), path))." if unsafe else
                               f"{path} is corrupt or truncated, or not a torch file ({_cause(e)}); replace it with "
                               "a state dict saved by torch.save.") from None
    while isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict mapping names to tensors.")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise WeightsError(f"{path} is not a state dict: its entry {name!r} is a {type(value).__name__}, "
                               "not a tensor.")
    return strip_prefix(dict(state))


def strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Names under the prefix of the patch embedding (module., backbone., module.backbone., ...), without it;
    names outside it (a DINO projection head, a decoder) are dropped, as are pretraining-only tensors."""
    anchor = next((k for k in state if k.endswith("patch_embed.proj.weight")), None)
    prefix = anchor[:-len("patch_embed.proj.weight")] if anchor else ""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(PRETRAINING_ONLY)}


# The Hugging Face hub's cache: --weights timm/<model name> resolves to a snapshot's weights file offline
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_name(name: str) -> bool:
    """'owner/model' (one slash, no weights-file suffix) names a hub repository, not a path."""
    return bool(HUB_NAME.fullmatch(name)) and not name.endswith((".pt", ".pth", ".bin", ".safetensors"))


def hub_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's own order)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def hub_weights(name: str) -> tuple[Path, dict]:
    """(the weights file, config.json as a dict ({} if absent)) of a hub model, from the cache or, online with
    huggingface_hub installed, downloaded into it."""
    folder = hub_cache_dir() / f"models--{name.replace('/', '--')}"
    snapshots, ref = folder / "snapshots", folder / "refs" / "main"
    candidates = [snapshots / ref.read_text().strip()] if ref.is_file() else []
    candidates += sorted(snapshots.iterdir()) if snapshots.is_dir() else []
    for snapshot in candidates:
        for file in HUB_WEIGHT_FILES:
            if (snapshot / file).is_file():
                config = snapshot / "config.json"
                return snapshot / file, json.loads(config.read_text()) if config.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download
        weights = Path(hf_hub_download(name, HUB_WEIGHT_FILES[0]))
        return weights, json.loads(Path(hf_hub_download(name, "config.json")).read_text())
    except Exception as e:
        raise WeightsError(f"{name} is not in the Hugging Face cache ({folder}) and could not be downloaded "
                           f"({_cause(e)}); online, run huggingface-cli download {name} (pip install "
                           "huggingface_hub), or pass the path of a weights file.") from None


def hub_normalization(config: Mapping) -> str | None:
    """A hub config's input mean and std (timm keeps them under pretrained_cfg) as 'r,g,b/r,g,b', or None."""
    cfg = config.get("pretrained_cfg", config)
    mean, std = cfg.get("mean"), cfg.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        return None
    return ",".join(f"{v:g}" for v in mean) + "/" + ",".join(f"{v:g}" for v in std)


def _cause(e: Exception) -> str:
    """An exception's first line, for a one-sentence message."""
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else type(e).__name__


def config_from_state_dict(state: Mapping[str, Tensor], *, img_size: int, heads: int = 0) -> ViTConfig:
    """Width, depth, patch and MLP width read from the tensors; heads given, or timm's count for the width."""
    for key in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise WeightsError(f"the weights have no {key}, so they are not a timm-format ViT.")
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape  # (D, 3, P, P)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if not heads:
        if dim not in TIMM_HEADS:
            raise WeightsError(f"the weights have width {dim}, for which timm has no standard head count; "
                               "give it with --heads.")
        heads = TIMM_HEADS[dim]
    if dim % heads:
        raise WeightsError(f"width {dim} does not split into {heads} heads; give a divisor of {dim} to --heads.")
    return ViTConfig(img_size=img_size, patch=patch, dim=dim, depth=depth, heads=heads,
                     mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0])


def resample_pos_embed(pos: Tensor, grid: int) -> Tensor:
    """(1, 1 + s*s, D) -> (1, 1 + grid*grid, D): the class token's row kept, the s x s grid resized bicubically.

    No antialiasing when shrinking: DINOv2 resizes its grid this way at run time, so a file saved at its
    native grid keeps the function it was trained with (docs/deviations.md, deviation 3).
    """
    cls, patches = pos[:, :1], pos[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise WeightsError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid.")
    if side == grid:
        return pos
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).double()  # (1, D, s, s)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


def fold_layer_scale(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LayerScale (timm's blocks.i.ls1.gamma, ls2.gamma) folded exactly into attn.proj and mlp.fc2.

    x + gamma * (W h + b) = x + (diag(gamma) W) h + gamma * b, so W' = gamma[:, None] W and b' = gamma b.
    """
    out = dict(state)
    for key in [k for k in state if k.endswith((".ls1.gamma", ".ls2.gamma"))]:
        block, which = key.rsplit(".", 2)[0], key.split(".")[-2]
        linear = f"{block}.attn.proj" if which == "ls1" else f"{block}.mlp.fc2"
        gamma = out.pop(key)
        out[f"{linear}.weight"] = gamma[:, None] * out[f"{linear}.weight"]
        out[f"{linear}.bias"] = gamma * out[f"{linear}.bias"]
    return out


def load_backbone_(model: ViT, state: Mapping[str, Tensor]) -> None:
    """Fill every backbone tensor of `model` from a timm-format state dict, using every tensor of the file.

    LayerScale is folded and the position grid resampled to the model's input size first; a classifier head
    in the file is ignored (a continual learner starts with a fresh one). Anything else that does not fit
    stops with one sentence naming the first tensor at fault.
    """
    state = fold_layer_scale({k: v for k, v in state.items() if not k.startswith("head.")})
    if "pos_embed" in state:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.cfg.grid)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    for name in state:
        if name not in own:
            raise WeightsError(f"the weights hold {name}, which this ViT has no place for (depth {model.cfg.depth},"
                               " no extra norms or tokens).")
    for name, tensor in own.items():
        if name not in state:
            raise WeightsError(f"the weights lack {name}, which this ViT needs.")
        if state[name].shape != tensor.shape:
            raise WeightsError(f"the weights give {name} the shape {tuple(state[name].shape)}, but this ViT "
                               f"needs {tuple(tensor.shape)}.")
    model.load_state_dict(state, strict=False)  # strict on everything but the head, checked above


TORCHVISION_WEIGHTS = {"vit_b_16": "ViT_B_16_Weights", "vit_b_32": "ViT_B_32_Weights", "vit_l_16": "ViT_L_16_Weights"}


def timm_names_from_torchvision(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision VisionTransformer state dict to this file's (timm's) parameter names."""
    fixed = {"conv_proj.weight": "patch_embed.proj.weight", "conv_proj.bias": "patch_embed.proj.bias",
             "class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
             "encoder.ln.weight": "norm.weight", "encoder.ln.bias": "norm.bias",
             "heads.head.weight": "head.weight", "heads.head.bias": "head.bias"}
    in_block = {"ln_1": "norm1", "self_attention.in_proj_weight": "attn.qkv.weight",
                "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj",
                "ln_2": "norm2", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    prefix = "encoder.layers.encoder_layer_"
    out = {}
    for name, value in state.items():
        if name in fixed:
            out[fixed[name]] = value
            continue
        if not name.startswith(prefix):
            raise WeightsError(f"{name} is not a parameter of torchvision's VisionTransformer.")
        index, rest = name[len(prefix):].split(".", 1)
        match = next(((old, new) for old, new in in_block.items() if rest.startswith(old)), None)
        if match is None:
            raise WeightsError(f"{name} is not a parameter of torchvision's VisionTransformer.")
        out[f"blocks.{index}.{match[1]}{rest[len(match[0]):]}"] = value
    return out


def torchvision_weights(preset: str) -> dict[str, Tensor]:
    """torchvision's ImageNet-1k weights of a preset, in timm names (downloaded once into torch's hub cache)."""
    import torchvision
    enum = getattr(torchvision.models, TORCHVISION_WEIGHTS[preset]).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[1]
    existed = cached.is_file()
    try:
        state = torch.hub.load_state_dict_from_url(enum.url, map_location="cpu", progress=False, check_hash=True)
    except Exception as e:
        if existed:
            raise WeightsError(f"the cached weights {cached} are corrupt or truncated ({_cause(e)}); delete the "
                               "file and run again.") from None
        raise WeightsError(f"could not download {preset}'s ImageNet weights ({_cause(e)}); offline, put "
                           f"{cached.name} (from {enum.url}) into {cached.parent}/, or pass --weights PATH or "
                           "--weights random.") from None
    return timm_names_from_torchvision(state)
