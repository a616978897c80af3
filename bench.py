"""Benchmarks (not tests): numbers for the README, each printed with the command and machine that made it.

    python bench.py --search            TreeLoRA's bandit search: time per training step against stored tasks

A benchmark asserts nothing; the tests check correctness, this file measures.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from treelora import LCBTreeSearch, build_kdtree, l1_pull


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def search_seconds_per_step(tasks: int, *, layers: int, rank: int, dim: int, steps: int,
                            device: torch.device, seed: int = 0) -> tuple[float, int]:
    """Seconds per training step spent choosing each layer's past task and scoring it (select, L1, update),
    and the height of the tree searched.

    The stored vectors have ViT-B/16's qkv LoRA-A shape (rank x dim) for each of `layers` layers.
    """
    g = torch.Generator().manual_seed(seed)
    drifts = [torch.randn(tasks, rank * dim, generator=g) for _ in range(layers)]
    stored = [torch.randn(tasks, rank, dim, generator=g).to(device) for _ in range(layers)]
    A = [torch.randn(rank, dim, generator=g).to(device) for _ in range(layers)]
    search = LCBTreeSearch(build_kdtree(drifts), layers, c=0.01, device=device)

    def step() -> None:
        k = search.select()
        targets = [s.index_select(0, k[l:l + 1])[0] for l, s in enumerate(stored)]
        search.update_(k, l1_pull(A, targets))

    for _ in range(tasks + 10):  # play every arm once, so the timed steps are the steady state
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps, search.tree.height


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", action="store_true", help="time TreeLoRA's search per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per measurement")
    args = parser.parse_args()
    if not args.search:
        parser.error("choose a benchmark, e.g. --search.")
    device = torch.device(args.device)
    print(f"TreeLoRA search per step on {machine(device)}, torch {torch.__version__} "
          f"(12 layers, stored A of shape 8 x 768, as ViT-B/16 qkv LoRA r=8)")
    print("| stored tasks | tree height | ms per step |\n| --- | --- | --- |")
    for tasks in (10, 50, 200):
        seconds, height = search_seconds_per_step(tasks, layers=12, rank=8, dim=768, steps=args.steps, device=device)
        print(f"| {tasks} | {height} | {1e3 * seconds:.3f} |")


if __name__ == "__main__":
    main()
