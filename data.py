"""Data for the continual-learning protocol: every reader, and the class-incremental split.

Each reader returns a dict of uint8 images (N, 3, S, S), int64 labels and the class names: Split CIFAR-100 from
its original pickles, Fashion-MNIST from its four idx files, a class-per-folder tree of images, and an offline
synthetic stand-in. `split_data` orders the classes (RandomState(class_seed).permutation(n)) and relabels them so
that task t owns the labels [t*c, (t+1)*c). Nothing here trains or seeds anything global.
"""
from __future__ import annotations

import gzip
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CIFAR_CLASSES = 100


class UserError(Exception):
    """A problem the user can fix; the scripts print it as one sentence and exit 1, no traceback."""


# ----------------------------------------------------------------------------------------------------------
# Split CIFAR-100: the original python pickles


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-100's python files hold: dicts, lists, bytes and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"asks to load {module}.{name}, which a CIFAR-100 file never does")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; avoid the deprecated alias
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if "which a CIFAR-100 file never does" in str(e):
            raise UserError(f"{path} {e}; refusing to unpickle it (tampered or wrong file).") from None
        raise UserError(f"{path} is corrupt or truncated ({e}); delete it to download it again.") from None
    except (EOFError, ValueError, TypeError) as e:
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}: {e or 'ends early'}); delete it "
                        "to download it again.") from None
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
                isinstance(y, int) and 0 <= y < CIFAR_CLASSES for y in labels):
            raise UserError(f"{folder / split} has no 'fine_labels' list of N labels in 0..99.")
        out[f"{split}_x"] = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # R, G, B planes, rows first
        out[f"{split}_y"] = torch.tensor(labels, dtype=torch.int64)
    names = read_cifar_pickle(folder / "meta").get("fine_label_names")
    if not isinstance(names, list) or len(names) != CIFAR_CLASSES:
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
                            f"({type(e).__name__}: {e}); put cifar-100-python/ there or use --dataset synthetic."
                            ) from None
    return read_cifar100(folder)


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST: four idx files, 28 x 28 grey images of 10 classes

FASHION_MNIST_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                       "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]  # label order, as torchvision's FashionMNIST.classes


def read_idx(path: Path) -> Tensor:
    """An idx file of unsigned bytes (gzipped when its name ends in .gz) -> a uint8 tensor of its shape.

    The format, as torchvision's MNIST readers read it: two zero bytes, the type code 0x08 (uint8), the number of
    dimensions n, n big-endian 4-byte sizes, then the values in row-major order.
    """
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); delete it and fetch it again."
                        ) from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] != 0x08:
        raise UserError(f"{path} is not an idx file of unsigned bytes (its header is {raw[:4].hex() or 'empty'}).")
    n = raw[3]
    if len(raw) < 4 + 4 * n:
        raise UserError(f"{path} is truncated inside its header; delete it and fetch it again.")
    shape = struct.unpack(f">{n}I", raw[4:4 + 4 * n])
    body = raw[4 + 4 * n:]
    if len(body) != math.prod(shape):
        raise UserError(f"{path} holds {len(body)} values, not the {math.prod(shape)} of its shape {shape}; delete it "
                        "and fetch it again.")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def find_fashion_mnist(root: Path) -> dict[str, Path] | None:
    """The four files under root or root/FashionMNIST/raw (torchvision's download folder), each gzipped or not."""
    found = {}
    for key, name in FASHION_MNIST_FILES.items():
        candidates = [folder / (name + gz) for folder in (root, root / "FashionMNIST" / "raw") for gz in ("", ".gz")]
        found[key] = next((p for p in candidates if p.is_file()), None)
    return found if all(found.values()) else None


def read_fashion_mnist(files: dict[str, Path]) -> dict:
    """The four idx files -> uint8 images (N, 3, 28, 28) (the grey channel three times), int64 labels 0..9."""
    out = {"class_names": list(FASHION_MNIST_CLASSES)}
    for split in ("train", "test"):
        x, y = read_idx(files[f"{split}_x"]), read_idx(files[f"{split}_y"])
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise UserError(f"{files[f'{split}_x']} and {files[f'{split}_y']} are not N images and N labels "
                            f"(shapes {tuple(x.shape)} and {tuple(y.shape)}).")
        if len(y) and int(y.max()) >= len(FASHION_MNIST_CLASSES):
            raise UserError(f"{files[f'{split}_y']} has a label {int(y.max())}; Fashion-MNIST's are 0..9.")
        out[f"{split}_x"] = x[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, 28, 28)
        out[f"{split}_y"] = y.long()
    return out


def load_fashion_mnist(root: str) -> dict:
    """Read the idx files under root, downloading them through torchvision when absent."""
    files = find_fashion_mnist(Path(root))
    if files is None:
        import torchvision
        try:
            for train in (True, False):
                torchvision.datasets.FashionMNIST(root, train=train, download=True)
        except Exception as e:
            names = ", ".join(f"{n}[.gz]" for n in FASHION_MNIST_FILES.values())
            cause = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"Fashion-MNIST ({names}) is not under --data-root {root} or "
                            f"{Path(root) / 'FashionMNIST' / 'raw'} and could not be downloaded ({type(e).__name__}: "
                            f"{cause}); Debian's package dataset-fashion-mnist puts the files in "
                            "/usr/share/datasets/fashion-mnist/.") from None
        files = find_fashion_mnist(Path(root))
    return read_fashion_mnist(files)


# ----------------------------------------------------------------------------------------------------------
# A class-per-folder tree of images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_image_folder(root: Path, img_size: int) -> dict:
    """root/{train,test}/<class>/<image> -> uint8 images (N, 3, S, S) and labels.

    S is the smaller of img_size and the largest side among the images: small images (Tiny-ImageNet's 64 px, a
    CIFAR tree's 32 px) are stored at their own size, not at the backbone's input size, and the loop resizes each
    batch (to_model_input). Images of another size are resized to S x S (antialiased). The output is allocated
    once and filled, never stacked from a list (which would hold every image twice). Classes are the sorted
    folder names under train/; test/ must hold the same ones. Every unreadable file is named in one error.
    """
    from PIL import Image  # Pillow: installed with torchvision

    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{root / 'train'} holds no class folders.")
    if not (root / "test").is_dir() or sorted(p.name for p in (root / "test").iterdir() if p.is_dir()) != classes:
        raise UserError(f"{root / 'test'} must hold the same class folders as {root / 'train'}.")
    files, sides, unreadable = {}, [], []
    for split in ("train", "test"):
        files[split] = []
        for label, name in enumerate(classes):
            for path in sorted((root / split / name).iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(path) as img:  # reads the header only
                        sides.append(max(img.size))
                    files[split].append((path, label))
                except (OSError, ValueError, SyntaxError):  # what Pillow raises for unreadable or broken files
                    unreadable.append(str(path))
        if not files[split] and not unreadable:
            raise UserError(f"{root / split} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    side = min(img_size, max(sides, default=img_size))
    out = {"class_names": classes}
    for split in ("train", "test"):
        images = torch.empty(len(files[split]), 3, side, side, dtype=torch.uint8)
        for i, (path, _) in enumerate(files[split]):
            try:
                with Image.open(path) as img:
                    x = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W)
            except (OSError, ValueError, SyntaxError):  # a header that reads but pixels that do not
                unreadable.append(str(path))
                continue
            if x.shape[1:] != (side, side):
                x = F.interpolate(x[None].float(), size=(side, side), mode="bilinear", antialias=True)[0]
                x = x.round().clamp(0, 255).to(torch.uint8)
            images[i] = x
        out[f"{split}_x"] = images
        out[f"{split}_y"] = torch.tensor([label for _, label in files[split]], dtype=torch.int64)
    if unreadable:
        raise UserError(f"{len(unreadable)} file(s) cannot be read as images: {', '.join(unreadable)}.")
    return out


# ----------------------------------------------------------------------------------------------------------
# Offline synthetic data


def make_synthetic(seed: int, train_per_class: int = 100, test_per_class: int = 20) -> dict:
    """A learnable, CIFAR-shaped offline dataset: 100 classes in 20 coarse groups of 5.

    Class c's prototype is its coarse group's low-frequency pattern plus its own finer pattern, so classes of
    a group look alike (as CIFAR-100's superclasses do); each sample gets its own random shift of up to 2
    pixels, a random contrast and pixel noise.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(20, 3, 4, 4, generator=g)  # one pattern per coarse group
    fine = torch.rand(CIFAR_CLASSES, 3, 8, 8, generator=g)
    up = lambda t: F.interpolate(t, size=32, mode="bilinear", align_corners=False)
    protos = 0.55 * up(coarse)[torch.arange(CIFAR_CLASSES) // 5] + 0.45 * up(fine)  # (100, 3, 32, 32)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(CIFAR_CLASSES).repeat_interleave(n)
        shifts = torch.randint(-2, 3, (len(y), 2), generator=g)  # (N, 2): one (dy, dx) per image
        rows = (torch.arange(32)[None] - shifts[:, :1]) % 32  # (N, 32): a roll by dy, as an index
        cols = (torch.arange(32)[None] - shifts[:, 1:]) % 32
        x = protos[y][torch.arange(len(y))[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, 32, 32, 3)
        x = x.permute(0, 3, 1, 2) * (0.8 + 0.4 * torch.rand(len(y), 1, 1, 1, generator=g))
        x = x + 0.12 * torch.randn(x.shape, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    (train_x, train_y), (test_x, test_y) = sample(train_per_class), sample(test_per_class)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
            "class_names": [f"synthetic_{c}" for c in range(CIFAR_CLASSES)]}


# ----------------------------------------------------------------------------------------------------------
# The class-incremental split


def class_order(class_seed: int, n: int = CIFAR_CLASSES) -> list[int]:
    """PyCIL/PILOT convention; for CIFAR-100, seed 1993 begins 68, 56, 78, 8, 23, 84, 90, 65, 74, 76."""
    return np.random.RandomState(class_seed).permutation(n).tolist()


DOMAINS = ("as is", "inverted", "rotated 90", "rotated 180")  # --domains k uses the first k


def domain_image(x: Tensor, domain: int) -> Tensor:
    """uint8 images (N, 3, H, W) in one of DOMAINS: as they are, inverted (255 - x), or rotated by 90 or 180
    degrees counter-clockwise (not a horizontal flip, which the augmentation applies anyway)."""
    if domain == 1:
        return 255 - x
    return torch.rot90(x, k=domain - 1, dims=(2, 3)) if domain else x


def with_domains(raw: dict, domains: int, train_per_class: int = 0, test_per_class: int = 0) -> dict:
    """Every class seen in `domains` domains: n classes become domains * n, class d * n + c being class c in domain
    d (named 'name (inverted)' and so on). Each class's first train_per_class / test_per_class images (0: all) are
    kept, the same images in every domain, so the domains differ in their pixels alone."""
    n, out = len(raw["class_names"]), {"class_names": []}
    for d in range(domains):
        out["class_names"] += [name if d == 0 else f"{name} ({DOMAINS[d]})" for name in raw["class_names"]]
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        keep = first_per_class(raw[f"{split}_y"], n, per_class)
        x, y = raw[f"{split}_x"][keep], raw[f"{split}_y"][keep]
        out[f"{split}_x"] = torch.cat([domain_image(x, d) for d in range(domains)])
        out[f"{split}_y"] = torch.cat([y + d * n for d in range(domains)])
    return out


def domain_class_order(class_seed: int, n: int, domains: int, classes_per_task: int) -> list[int]:
    """The class order of the domain regime: the n base classes in RandomState(class_seed).permutation(n), cut into
    tasks of classes_per_task; task t takes domain t mod domains and that domain's next chunk, so the most similar
    earlier task (the same domain) is `domains` tasks back, never the previous one."""
    base, order = class_order(class_seed, n), []
    for d, chunk in zip(*domain_task_layout(domains * n // classes_per_task, domains)):
        order += [d * n + c for c in base[chunk * classes_per_task:(chunk + 1) * classes_per_task]]
    return order


def domain_task_layout(tasks: int, domains: int) -> tuple[list[int], list[int]]:
    """Per task of domain_class_order: its domain (t mod domains) and which chunk of the base classes it holds
    (t div domains), the two axes the structure measures read."""
    return [t % domains for t in range(tasks)], [t // domains for t in range(tasks)]


@dataclass
class SplitData:
    """Images stay uint8 on the training device; labels are relabelled so task t owns [t*c, (t+1)*c)."""

    train_x: Tensor  # (N, 3, S, S) uint8
    train_y: Tensor  # (N,) int64, position of the class in the class order
    test_x: Tensor
    test_y: Tensor
    classes_per_task: int
    order: list[int]
    class_names: list[str]  # in class order

    @property
    def num_classes(self) -> int:
        return len(self.order)

    def task_range(self, task: int) -> tuple[int, int]:
        return task * self.classes_per_task, (task + 1) * self.classes_per_task

    def train_indices(self, task: int) -> Tensor:
        lo, hi = self.task_range(task)
        return ((self.train_y >= lo) & (self.train_y < hi)).nonzero().squeeze(1)


def first_per_class(y: Tensor, n: int, per_class: int) -> Tensor:
    """Indices (sorted) of the first per_class examples of each of the n classes in y (0: all of them)."""
    if not per_class:
        return torch.arange(len(y))
    return torch.cat([(y == c).nonzero().squeeze(1)[:per_class] for c in range(n)]).sort().values


def split_data(raw: dict, *, order: list[int], tasks: int, train_per_class: int, device: torch.device,
               test_per_class: int = 0) -> SplitData:
    n = len(order)
    relabel = torch.empty(n, dtype=torch.int64)
    relabel[torch.tensor(order)] = torch.arange(n)
    train_y, test_y = relabel[raw["train_y"]], relabel[raw["test_y"]]
    train = first_per_class(train_y, n, train_per_class)
    test = first_per_class(test_y, n, test_per_class)
    return SplitData(raw["train_x"][train].to(device), train_y[train].to(device), raw["test_x"][test].to(device),
                     test_y[test].to(device), n // tasks, order, [raw["class_names"][c] for c in order])
