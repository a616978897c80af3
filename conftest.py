"""Shared test helpers. Hypothesis is derandomised when CI is set (CI=true in .ci/run).

pytest.ini runs the suite on 2 pytest-xdist workers: much of it waits on child processes (killed and resumed runs,
torchrun, the bench), so two workers keep both cores busy. Each worker and every process it starts then uses one
thread, so the two workers together use the machine's two cores.
"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import continual
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker and per child process it starts
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

HERE = Path(__file__).parent
# the smallest runs that still learn: vit_nano (2 blocks, width 48) on synthetic data with the random-init smoke
# protocol (one rate 5e-3, the masked linear head: cheapest; test_classifier.py and test_resume.py run the other
# heads, an aligned head with 2 epochs of retraining instead of 20 on the synthetic data's 100 classes)
TINY = ["--dataset", "synthetic", "--backbone", "vit_nano", "--batch-size", "32", "--lr", "5e-3", "--head-lr", "5e-3",
        "--classifier", "linear", "--align-epochs", "2"]


def write_cifar100_pickles(root: Path, train_per_class: int = 6, test_per_class: int = 3, seed: int = 0) -> Path:
    """Write cifar-100-python/{train,test,meta} in the original format (dicts of bytes keys, protocol 2).

    The images come from data.make_synthetic, so a model can learn them; labels are fine labels 0..99.
    """
    from data import make_synthetic

    raw = make_synthetic(seed, train_per_class, test_per_class)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        x, y = raw[f"{split}_x"], raw[f"{split}_y"]
        d = {b"filenames": [f"img_{i}.png".encode() for i in range(len(y))], b"batch_label": split.encode(),
             b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(),
             b"data": x.reshape(len(y), 3072).numpy()}
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
    meta = {b"fine_label_names": [f"class_{c}".encode() for c in range(100)],
            b"coarse_label_names": [f"super_{c}".encode() for c in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def run_script(script: str, argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python <script>.py argv` in the repository; assert it succeeded."""
    proc = subprocess.run([sys.executable, f"{script}.py", *argv], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


def learned(results: dict, factor: float = 2.0) -> bool:
    """Whether each task, right after its training, beat chance among the classes seen by then `factor`-fold.

    A broken loop (no gradient, wrong labels, wrong head rows) stays at chance; forgetting does not enter.
    """
    acc, T = results["accuracy_matrix"], len(results["accuracy_matrix"])
    per_task = len(results["class_order"]) // len(acc[0])
    diagonal = [acc[t][t] for t in range(T)]
    chance = [100.0 / (per_task * (t + 1)) for t in range(T)]
    return sum(diagonal) / T > factor * sum(chance) / T


def assert_mechanism_drawn(out: Path, stdout: str) -> None:
    """A method's run folder holds mechanism.png when matplotlib is installed; `python continual.py FOLDER` draws it
    again from results.json alone; without matplotlib the log says so."""
    import importlib.util
    if not importlib.util.find_spec("matplotlib"):
        assert "no mechanism.png: matplotlib is not installed" in stdout
        return
    png = out / "mechanism.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in stdout
    png.unlink()
    proc = subprocess.run([sys.executable, "continual.py", str(out)], cwd=HERE, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and f"plot: {png}" in proc.stdout and png.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def usage_error(capsys):
    """Parse argv with a script's Args; assert exit code 2 and no traceback; return the error's last line."""
    from flags import parse_args

    def run(args_cls: type, argv: list[str]) -> str:
        with pytest.raises(SystemExit) as e:
            parse_args(args_cls, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        return err.strip().splitlines()[-1]

    return run


def interrupt_evaluation(monkeypatch, at: int):
    """Make the loop's evaluation raise KeyboardInterrupt (a Ctrl-C) on its `at`-th call, so that the run stops with
    the tasks before it checkpointed; returns the call that puts the real evaluation back."""
    real, calls = continual.evaluate_heads, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(continual, "evaluate_heads", interrupted)
    return lambda: monkeypatch.setattr(continual, "evaluate_heads", real)
