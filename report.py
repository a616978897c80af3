"""What a run writes and draws: log.txt, results.json (readable, written atomically), accuracy.png, and each
method's mechanism picture (mechanism.png: HAM's groups, TreeLoRA's picks, TRM's merges), with the structure
measures of --domains (does a mechanism follow the tasks' known structure). Nothing here trains or reads a
model: everything is drawn from results.json, so `python continual.py RUN_FOLDER` redraws any run.

The mechanism pictures live here, together, rather than beside each method: a method file holds its method
only, and one place draws every picture from the same results.json keys that the methods' end_task records.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# The structure measures (--domains): does a mechanism follow the domains, or the base classes


def structure_measures(domains: Sequence[int], groups: Sequence[Sequence[int]] | None, tasks: Sequence[dict],
                       classes: Sequence[int] | None = None) -> dict:
    """Whether a method found a known task structure (--domains: task t's domain is domains[t]; classes[t] names
    its base classes, which the same chunk of classes in the other domains shares: data.domain_class_order).

    HAM: the share of same-domain pairs among the pairs of tasks that share a group, against a random grouping of
    the same tasks (a random pair of them shares a domain with probability sum_d n_d (n_d - 1) / (n (n - 1))).
    TreeLoRA: the share of its picks (every layer, every step) that chose a past task of the current task's domain,
    against a uniform pick's (the share of same-domain tasks among the past ones, weighted by the picks); and the
    same for the past task an exhaustive search calls nearest. TRM: the old-class predictions each merge keeps.
    Each share is also given for the same base classes (keys with "classes"). Groups count tasks from 1.
    """
    out = {}
    axes = {"domain": domains, **({"classes": classes} if classes else {})}
    suffix = {"domain": "", "classes": "_classes"}  # the chance keys: random_grouping, uniform_pick (+ _classes)
    if groups:
        pairs = [(a - 1, b - 1) for g in groups for i, a in enumerate(g) for b in g[i + 1:]]
        n = sum(len(g) for g in groups)
        g = out["ham_groups"] = {"pairs": len(pairs)}
        for axis, label in axes.items():
            members = [label[m - 1] for grp in groups for m in grp]
            counts = [members.count(d) for d in set(members)]
            g[f"same_{axis}_pairs"] = sum(label[a] == label[b] for a, b in pairs) / len(pairs) if pairs else None
            g[f"random_grouping{suffix[axis]}"] = sum(c * (c - 1) for c in counts) / (n * (n - 1)) if n > 1 else None
    picked = [(i, np.array(t["selections"]).sum(0)) for i, t in enumerate(tasks) if "selections" in t]
    if picked:  # per task with picks: the picks of each past task summed over layers
        total = sum(c.sum() for _, c in picked)
        p = out["treelora_picks"] = {}
        for axis, label in axes.items():
            same = [(c, np.array([label[j] == label[i] for j in range(len(c))])) for i, c in picked]
            p[f"same_{axis}_share"] = float(sum(c[m].sum() for c, m in same) / total)
            p[f"uniform_pick{suffix[axis]}"] = float(sum(c.sum() * m.mean() for c, m in same) / total)
            if axis == "domain":
                p["per_task"] = [float(c[m].sum() / max(c.sum(), 1)) for c, m in same]
    merges = [t for t in tasks if "old_predictions_kept" in t.get("objectives_before", {})]
    if merges:  # TRM: on each merge's batch, the old classes' predictions the merge keeps, plain merge and after
        mean = lambda when, key: float(np.mean([t[f"objectives_{when}"][key] for t in merges]))
        out["trm_merges"] = {"merges": len(merges),
                             "kept_plain": mean("before", "old_predictions_kept"),
                             "kept_merged": mean("after", "old_predictions_kept"),
                             "consistency_plain": mean("before", "consistency"),
                             "consistency_merged": mean("after", "consistency")}
    for key in ("nearest_position", "nearest_drift"):  # TreeLoRA: the exhaustive nearest past task, per layer
        near = [(i, t[key]) for i, t in enumerate(tasks) if key in t]
        if near:
            m = out[f"treelora_{key}"] = {"previous_share": float(np.mean([k == i - 1 for i, ks in near for k in ks]))}
            for axis, label in axes.items():
                m[f"same_{axis}_share"] = float(np.mean([label[k] == label[i] for i, ks in near for k in ks]))
                m[f"uniform_pick{suffix[axis]}"] = float(np.mean([np.mean([label[j] == label[i] for j in range(i)])
                                                                  for i, _ in near]))
    return out


# ----------------------------------------------------------------------------------------------------------
# What a drift remedy wins back of what stale statistics cost

MIN_GAP = 0.5  # points: a stale-to-oracle gap below this leaves nothing measurable to win back


def drift_recovery(a_last: dict[str, float]) -> dict[str, float | None]:
    """For every head 'KIND/REMEDY' (a --drift other than none and oracle) whose stale head 'KIND' and oracle
    'KIND/oracle' ran on the same backbone: the share of the stale-statistics loss the remedy wins back,
    (remedy - stale) / (oracle - stale); 1 is the oracle's accuracy, 0 the stale head's, below 0 a loss. None where
    the oracle is within MIN_GAP points of the stale head (nothing to win back). a_last: head name -> A_last."""
    shares = {}
    for name, value in a_last.items():
        kind, _, remedy = name.partition("/")
        if remedy in ("", "none", "oracle") or kind not in a_last or f"{kind}/oracle" not in a_last:
            continue
        gap = a_last[f"{kind}/oracle"] - a_last[kind]
        shares[name] = (value - a_last[kind]) / gap if gap >= MIN_GAP else None
    return shares


def describe_drift_recovery(a_last: dict[str, float], shares: dict[str, float | None]) -> list[str]:
    lines = []
    for name, share in shares.items():
        kind = name.partition("/")[0]
        stale, oracle = a_last[kind], a_last[f"{kind}/oracle"]
        verb = ("(the oracle's means, stale covariances) wins back" if name.endswith("/oracle-mean") else
                "(the means alone moved, stale covariances) wins back" if name.endswith("-mean") else "wins back")
        lines.append(f"drift: {name} {verb} " + (f"{100 * share:.0f}% of the {oracle - stale:.2f} points stale "
                                                      f"statistics cost" if share is not None else
                                                      f"nothing measurable (the oracle is {oracle - stale:+.2f})")
                     + f" ({kind} {stale:.2f} -> {a_last[name]:.2f}; oracle {oracle:.2f})")
    return lines


def describe_structure(measures: dict) -> list[str]:
    lines = []
    if measures.get("ham_groups", {}).get("same_domain_pairs") is not None:
        g = measures["ham_groups"]
        lines.append(f"structure: {100 * g['same_domain_pairs']:.0f}% of the {g['pairs']} pairs of tasks sharing a HAM "
                     f"group share a domain (random grouping: {100 * g['random_grouping']:.0f}%)" + classes_note(
                         g.get("same_classes_pairs"), g.get("random_grouping_classes")))
    if "treelora_picks" in measures:
        p = measures["treelora_picks"]
        lines.append(f"structure: {100 * p['same_domain_share']:.0f}% of TreeLoRA's picks chose a past task of the "
                     f"current task's domain (uniform picks: {100 * p['uniform_pick']:.0f}%)"
                     + classes_note(p.get("same_classes_share"), p.get("uniform_pick_classes")))
    if "trm_merges" in measures:
        m = measures["trm_merges"]
        lines.append(f"structure: over {m['merges']} TRM merges, the share of each merge batch's old-class predictions "
                     f"kept from the previous model is {100 * m['kept_merged']:.1f}% after the merge against "
                     f"{100 * m['kept_plain']:.1f}% for the plain merge (consistency loss "
                     f"{m['consistency_merged']:.4f} against {m['consistency_plain']:.4f})")
    for key, what in (("nearest_position", "mean A"), ("nearest_drift", "drift of A")):
        if f"treelora_{key}" in measures:
            p = measures[f"treelora_{key}"]
            lines.append(f"structure: the past task nearest by {what} (exhaustive, per layer) shares the domain "
                         f"{100 * p['same_domain_share']:.0f}% of the time (uniform: {100 * p['uniform_pick']:.0f}%; "
                         f"the previous task: {100 * p['previous_share']:.0f}%)"
                         + classes_note(p.get("same_classes_share"), p.get("uniform_pick_classes")))
    return lines


def classes_note(found: float | None, chance: float | None) -> str:
    return "" if found is None else f"; the same base classes: {100 * found:.0f}% (chance: {100 * chance:.0f}%)"


def format_seconds(s: float) -> str:
    return f"{s / 3600:.1f}h" if s >= 3600 else f"{s / 60:.1f}m" if s >= 60 else f"{s:.0f}s"


# ----------------------------------------------------------------------------------------------------------
# Files of a run: log.txt, results.json, the pictures


def readable_json(obj, depth: int = 0) -> str:
    """JSON with one key per line and every list of plain values (a row of the matrix) on one line."""
    pad = " " * depth
    if isinstance(obj, dict) and obj:
        items = ",\n".join(f"{pad} {json.dumps(k)}: {readable_json(v, depth + 1)}" for k, v in obj.items())
        return "{\n" + items + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad + " " + readable_json(v, depth + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def write_atomic(path: Path, write: Callable[[object], None], mode: str = "w") -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over `path`: a crash at any
    moment leaves either the old or the new file, never a broken one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLog:
    """Prints each line (flushed) and appends it to out/log.txt; the file is opened at the first line."""

    def __init__(self, out: Path, prefix: str, enabled: bool = True):
        self.path, self.prefix, self.file, self.enabled = out / "log.txt", prefix, None, enabled  # rank 0 only

    def __call__(self, line: str) -> None:
        if self.enabled:
            print(self.prefix + line, flush=True)
        self.write(self.prefix + line)

    def write(self, line: str) -> None:
        """To the file only (errors, which main_guard prints on stderr)."""
        if not self.enabled:
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")
        self.file.write(line + "\n")
        self.file.flush()


def plot_accuracy(results: dict, path: Path) -> str:
    """accuracy.png: the accuracy matrix as a heatmap and A_t per task. Returns a line for the log."""
    plt = _pyplot()
    if plt is None:
        return "no accuracy.png: matplotlib is not installed (pip install matplotlib)."
    acc = np.array([[np.nan if v is None else v for v in row] for row in results["accuracy_matrix"]])
    T = acc.shape[1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    image = left.imshow(acc, vmin=0, vmax=100, cmap="viridis")
    left.set(title="a[t][j]: accuracy on task j after task t", xlabel="task j", ylabel="after task t",
             xticks=range(T), xticklabels=range(1, T + 1), yticks=range(len(acc)), yticklabels=range(1, len(acc) + 1))
    fig.colorbar(image, ax=left, label="%")
    A = results["metrics"]["A_t"]
    right.plot(range(1, len(A) + 1), A, marker="o")
    right.set(title=f"A_t (A_last {A[-1]:.1f}%)", xlabel="task t", ylabel="accuracy on all seen classes (%)",
              ylim=(0, 100), xticks=range(1, T + 1))
    fig.suptitle(f"{results['method']} on {results['config']['dataset']}, {T} tasks"
                 + (" (synthetic data)" if results["synthetic_data"] else ""))
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return f"plot: {path}"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_mechanism(results: dict, path: Path) -> str:
    """mechanism.png: what the method decided at each task, drawn from results.json alone (HAM's groups, TreeLoRA's
    picks, TRM's merges); a run whose results hold none of these draws nothing. Returns a line for the log."""
    tasks = results["tasks"]
    kind = ("ham" if "groups" in results else "treelora" if any("selections" in t for t in tasks)
            else "trm" if any("coefficients" in t for t in tasks) else None)
    if kind is None:
        return ""
    plt = _pyplot()
    if plt is None:
        return "no mechanism.png: matplotlib is not installed (pip install matplotlib)."
    fig = {"ham": _draw_ham, "treelora": _draw_treelora, "trm": _draw_trm}[kind](plt, results)
    fig.suptitle(f"{results['method']}: what it decided at each task ({results['config']['dataset']}, "
                 f"{len(tasks)} of {results['config']['tasks']} tasks)"
                 + (" (synthetic data)" if results["synthetic_data"] else ""))
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return f"plot: {path}"


def _draw_ham(plt, results: dict):
    """Which group each task joined or opened, its importance alpha_t, and the similarities that decided."""
    tasks, T = results["tasks"], len(results["tasks"])
    x = range(1, T + 1)
    fig, (groups, alpha, sims) = plt.subplots(1, 3, figsize=(15, 4.2))
    reasons = ["joined the most similar group" if not t["opened"] else "opened: the first task" if "first" in t["why"]
               else "opened: a free group for each task left" if "free group" in t["why"]
               else "opened: no group similar enough" for t in tasks]
    for reason, marker in (("opened: the first task", "D"), ("opened: a free group for each task left", "o"),
                           ("opened: no group similar enough", "^"), ("joined the most similar group", "s")):
        xs = [i + 1 for i in range(T) if reasons[i] == reason]
        if xs:  # with --domains, the colour is the task's domain: a group of one colour found the structure
            colours = [f"C{results['task_domains'][i - 1]}" for i in xs] if "task_domains" in results else "C0"
            groups.scatter(xs, [tasks[i - 1]["group"] for i in xs], marker=marker, s=60, c=colours)
            groups.scatter([], [], marker=marker, s=40, color="grey", label=reason)  # the legend's entry
    for d in sorted(set(results.get("task_domains", []))):
        groups.scatter([], [], marker="o", s=40, color=f"C{d}", label=f"domain {d + 1}")
    groups.set(title="group of each task" + (" (colour: its domain)" if "task_domains" in results else ""),
               xlabel="task", ylabel="group", xticks=list(x),
               yticks=range(1, max(t["group"] for t in tasks) + 1))
    groups.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    alpha.bar(list(x), [t["importance"] for t in tasks], color="tab:orange")
    alpha.axhline(0, color="black", lw=0.5)
    alpha.set(title="importance alpha_t (the adapter's scale)", xlabel="task", xticks=list(x))
    for i, t in enumerate(tasks):
        if t["similarities"]:
            sims.scatter([i + 1] * len(t["similarities"]), t["similarities"], color="grey", s=15)
            if not t["opened"]:
                sims.scatter([i + 1], [t["similarities"][t["group"] - 1]], color="tab:red", s=50, zorder=3)
    sims.axhline(results["config"].get("threshold", 0), color="tab:blue", ls="--", lw=1, label="threshold")
    sims.scatter([], [], color="grey", s=15, label="cosine to each group")
    sims.scatter([], [], color="tab:red", s=50, label="the group joined")
    sims.set(title="similarity to the existing groups", xlabel="task", ylabel="cosine", xticks=list(x))
    sims.legend(fontsize=8)
    return fig


def _draw_treelora(plt, results: dict):
    """Per layer group, each past task's share of the picks during each task against a uniform pick's; the pull's
    gradient ratio per epoch."""
    tasks, T = results["tasks"], len(results["tasks"])
    layers = next(len(t["selections"]) for t in tasks if "selections" in t)
    parts = [p for p in np.array_split(np.arange(layers), min(3, layers)) if len(p)]
    fig, axes = plt.subplots(1, len(parts) + 1, figsize=(4.4 * (len(parts) + 1), 4.4))
    for ax, part in zip(axes, parts):
        share = np.full((T, T), np.nan)  # [task, past task]: the share of picks over a uniform pick's, 1/(t-1)
        for i, t in enumerate(tasks):
            if "selections" in t:
                counts = np.array(t["selections"])[part].sum(0)  # (past tasks,)
                share[i, : len(counts)] = counts / max(counts.sum(), 1) * len(counts)
        shown = share[1:, :-1]
        image = ax.imshow(shown, vmin=0, vmax=2, cmap="RdBu_r", aspect="auto")
        if T <= 10:
            for (r, c), v in np.ndenumerate(shown):
                if not np.isnan(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
        which = f"layer {part[0] + 1}" if len(part) == 1 else f"layers {part[0] + 1}-{part[-1] + 1}"
        ax.set(title=f"picks / uniform picks, {which} of {layers}", xlabel="past task picked",
               ylabel="during task", xticks=range(T - 1), xticklabels=range(1, T), yticks=range(T - 1),
               yticklabels=range(2, T + 1))
    fig.colorbar(image, ax=axes[len(parts) - 1], label="1: as often as a uniform pick")
    ratios = [(i + 1, r) for i, t in enumerate(tasks) for r in t.get("grad_ratio_per_epoch", [])]
    last = axes[-1]
    if ratios:
        per_task = {}
        for task, r in ratios:
            per_task.setdefault(task, []).append(r)
        xs = [task + (e + 0.5) / len(rs) - 0.5 for task, rs in per_task.items() for e in range(len(rs))]
        last.plot(xs, [r for rs in per_task.values() for r in rs], marker=".")
        last.set(yscale="log" if min(r for _, r in ratios) > 0 else "linear")
    else:
        last.text(0.5, 0.5, "not in this results.json", ha="center", va="center", transform=last.transAxes)
    last.set(title="|grad of the pull| / |grad of CE| per epoch", xlabel="task", xticks=range(1, T + 1))
    return fig


def _draw_trm(plt, results: dict):
    """Each merge's coefficients (mean over layers, min-max band) and each objective before and after it."""
    tasks = [(i + 1, t) for i, t in enumerate(results["tasks"]) if "coefficients" in t]
    measured = [(i, t) for i, t in tasks if "objectives_after" in t]  # none with --merge-steps 0 (plain merge)
    names = list(measured[0][1]["objectives_after"]) if measured else []
    rows = math.ceil((1 + len(names)) / 3)
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.8 * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[1 + len(names):]:
        ax.axis("off")
    coef = axes[0]
    xs = [i for i, _ in tasks]
    width = len(tasks[0][1]["coefficients"][0])
    for k in range(width):  # the plain merge is c_K = 1, every other coefficient 0 (trm.initial_coefficients)
        values = np.array([[row[k] for row in t["coefficients"]] for _, t in tasks]) - (k == width - 2)
        label = "c_h (previous merge)" if k == width - 1 else f"c_{k + 1} (snapshot {k + 1})"
        coef.plot(xs, values.mean(1), marker="o", label=label)
        coef.fill_between(xs, values.min(1), values.max(1), alpha=0.2)
    coef.axhline(0, color="black", lw=0.5)
    coef.set(title="coefficients minus the plain merge's\n(mean over layers, band: min to max)", xlabel="task",
             xticks=xs)
    coef.legend(fontsize=7)
    mxs = [i for i, _ in measured]
    for ax, name in zip(axes[1:], names):
        ax.plot(mxs, [t["objectives_before"][name] for _, t in measured], marker="o", ls="--", label="plain merge")
        ax.plot(mxs, [t["objectives_after"][name] for _, t in measured], marker="o", label="after the merge")
        active = [i for i, t in measured if t.get("responsiveness_active")] if name == "responsiveness" else []
        ax.set(title=name + (f" (hinge active: tasks {active})" if active else ""), xlabel="task", xticks=mxs)
        ax.legend(fontsize=7)
    return fig


def draw(results: dict, folder: Path) -> list[str]:
    """accuracy.png and mechanism.png of a run into its folder; the log lines that say what was drawn."""
    return [line for line in (plot_accuracy(results, folder / "accuracy.png"),
                              plot_mechanism(results, folder / "mechanism.png")) if line]


def redraw(folder: Path) -> list[str]:
    """accuracy.png and mechanism.png of a run folder, drawn again from its results.json."""
    return draw(json.loads((folder / "results.json").read_text()), folder)
