"""Crash safety: killed runs resume to identical results; bad inputs stop cleanly and touch no file."""
import contextlib
import io
import json
import multiprocessing
import os
import random
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import continual
import ham
import treelora
import trm
from continual import CHECKPOINT
from lora_vit import PRESETS, ViT

SCRIPTS = {"ham": ham, "treelora": treelora, "trm": trm}
TINY = ["--dataset", "synthetic", "--backbone", "vit_nano", "--tasks", "4", "--epochs", "2", "--batch-size", "16",
        "--train-per-class", "8", "--rp-dim", "64"]
# TreeLoRA keeps the nearest-mean head beside its own: its statistics and rows must resume to the bit too
EXTRA = {"ham": ["--groups", "2"], "treelora": ["--compare-heads", "ncm"],
         "trm": ["--merge-steps", "6"]}
KILL_POINTS = 4  # i finished tasks before the kill (0-3), then a random part of a task: every task is hit


def _quiet_main(script: str, argv: list[str]) -> None:
    """A child process: run a script's main with its output discarded."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        SCRIPTS[script].main(argv)


@pytest.fixture(scope="module")
def processes():
    """Child processes forked from a server that has imported torch and the scripts once (fast to start)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*continual.PRELOAD, "test_resume"])
    warm = ctx.Process(target=int)  # the server starts and imports now, not inside the uninterrupted run's time
    warm.start()
    warm.join()
    return ctx


def _final_state(out: Path) -> tuple[dict, dict]:
    results = json.loads((out / "results.json").read_text())
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    return results, ckpt


def _assert_identical(out: Path, reference: Path) -> None:
    (r, c), (r0, c0) = _final_state(out), _final_state(reference)
    assert r["finished"] and r["accuracy_matrix"] == r0["accuracy_matrix"] and r["metrics"] == r0["metrics"]
    assert c["model"].keys() == c0["model"].keys()
    for k in c0["model"]:
        assert torch.equal(c["model"][k], c0["model"][k]), k  # bit-for-bit on the CPU
    for k in ("g", "drifts", "merged"):
        for a, b in zip(c["method_state"].get(k, []), c0["method_state"].get(k, [])):
            assert torch.equal(a, b), k
    for k in ("G", "Q", "ridge_weight"):  # the head's statistics (the default classifier, ridge, keeps G and Q)
        assert c["classifier"][k] is not None and torch.equal(c["classifier"][k], c0["classifier"][k]), k
    assert c["classifier"]["lam"] == c0["classifier"]["lam"]
    assert r["heads"] == r0["heads"] and c["compare_heads"].keys() == c0["compare_heads"].keys()
    for name, state in c0["compare_heads"].items():  # heads kept beside the run's (ridge: G, Q, its weights)
        for k, v in state.items():
            assert v == c["compare_heads"][name][k] if not torch.is_tensor(v) else torch.equal(v, c["compare_heads"][name][k]), k
    for a, b in zip(c["method_state"].get("groups", []), c0["method_state"].get("groups", [])):
        assert a["members"] == b["members"] and all(torch.equal(x, y) for x, y in zip(a["delta"], b["delta"]))


def _tasks_done(out: Path) -> int:
    try:
        return len(json.loads((out / "results.json").read_text())["accuracy_matrix"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_killed_run_resumes_to_identical_results(script, tmp_path, processes):
    """Kill point i waits until i mod 4 tasks are done, then a seeded random part of one task's time, so the
    kills land in every task's training, consolidation (HAM's merge, TRM's merge), evaluation or checkpoint."""
    argv = TINY + EXTRA[script]
    reference = tmp_path / "uninterrupted"
    t0 = time.perf_counter()
    p = processes.Process(target=_quiet_main, args=(script, argv + ["--out", str(reference)]))
    p.start()
    p.join()
    duration = time.perf_counter() - t0
    assert p.exitcode == 0
    rng = random.Random(f"kill points of {script}")  # seeded: the same delays every run
    resumed_from = []
    for i in range(KILL_POINTS):
        out = tmp_path / f"killed_{i}"
        p = processes.Process(target=_quiet_main, args=(script, argv + ["--out", str(out)]))
        p.start()
        while _tasks_done(out) < i % 4 and p.is_alive():
            time.sleep(0.01)
        p.join(timeout=rng.uniform(0.0, duration / 4))
        p.kill()  # SIGKILL: no clean-up of any kind
        p.join()
        done = torch.load(out / CHECKPOINT, weights_only=True)["accuracy_matrix"] if (out / CHECKPOINT).exists() else []
        resumed_from.append(len(done))
        again = ["--resume"] if (out / CHECKPOINT).exists() else []  # killed before the first checkpoint: restart
        p = processes.Process(target=_quiet_main, args=(script, argv + ["--out", str(out), *again]))
        p.start()
        p.join()
        assert p.exitcode == 0, f"resume after kill point {i} failed"
        _assert_identical(out, reference)
    print(script, "resumed from tasks", resumed_from)
    assert all(done >= i % 4 for i, done in enumerate(resumed_from)) and len(set(resumed_from)) >= 2


def test_crash_during_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch):
    argv = TINY + ["--tasks", "2", "--epochs", "1"]
    ham.main(argv + ["--out", str(tmp_path / "reference")])
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **k):  # the second task's checkpoint: half written, then the process "dies"
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x80\x02partial")
            raise SystemExit("killed while writing")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    out = tmp_path / "crashed"
    with pytest.raises(SystemExit):
        ham.main(argv + ["--out", str(out)])
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(out / CHECKPOINT, weights_only=True)["accuracy_matrix"][0] is not None  # task 1 intact
    assert len(torch.load(out / CHECKPOINT, weights_only=True)["accuracy_matrix"]) == 1
    ham.main(argv + ["--out", str(out), "--resume"])
    _assert_identical(out, tmp_path / "reference")


def test_non_finite_loss_names_task_epoch_and_step(tmp_path, monkeypatch, capsys):
    real = continual.task_logits
    steps = []

    def poisoned(model, x, classes):
        logits = real(model, x, classes)
        if classes.start > 0:  # the second task
            steps.append(1)
            if len(steps) == 3:
                return logits * float("nan")
        return logits

    monkeypatch.setattr(continual, "task_logits", poisoned)
    with pytest.raises(SystemExit) as e:
        continual.main_guard(lambda: ham.main(TINY + ["--out", str(tmp_path)]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and "Traceback" not in err
    assert "non-finite at task 2, epoch 1, step 3" in err
    assert len(torch.load(tmp_path / CHECKPOINT, weights_only=True)["accuracy_matrix"]) == 1


# ---- a table of bad inputs: each exits 2 (usage) or 1 (runtime) with one sentence and touches no file


def _malformed_flags() -> list[tuple[str, list[str], int, str]]:
    """Every numeric or choice flag of every script, given a value that is not of its kind."""
    rows = []
    for name, module in SCRIPTS.items():
        for f in fields(module.Args):
            flag = "--" + f.name.replace("_", "-")
            if "choices" in f.metadata:
                rows.append((name, [flag, "no-such-choice"], 2, "invalid choice"))
            elif isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
                rows.append((name, [flag, "twelve"], 2, f"invalid {type(f.default).__name__} value"))
    return rows


OUT_OF_RANGE = [
    ("ham", ["--tasks", "3"], 2, "--tasks must divide the 100 classes"),
    ("ham", ["--rank", "-2"], 2, "--rank must be at least 1"),
    ("ham", ["--density", "2"], 2, "--density must be in (0, 1]"),
    ("ham", ["--weights", "/no/such.pt"], 2, "no such file"),
    ("treelora", ["--grad-density", "-0.1"], 2, "--grad-density must be in (0, 1]"),
    ("treelora", ["--epochs", "0"], 2, "--epochs must be at least 1"),
    ("trm", ["--snapshots", "-1"], 2, "--snapshots must be between 0"),
    ("trm", ["--mu", "nan"], 2, "--mu must be a non-negative number"),
]


def _run(script: str, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        continual.main_guard(lambda: SCRIPTS[script].main(argv))
    return e.value.code, capsys.readouterr().err.strip()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def finished_ham_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    ham.main(TINY + ["--tasks", "2", "--epochs", "1", "--out", str(out)])
    return out


@pytest.mark.parametrize("script,argv,code,message", _malformed_flags() + OUT_OF_RANGE,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_bad_flag_exits_cleanly_and_touches_nothing(script, argv, code, message, finished_ham_run, capsys):
    before = _snapshot(finished_ham_run)
    got, err = _run(script, TINY + ["--tasks", "2", "--epochs", "1", "--out", str(finished_ham_run), "--resume", *argv],
                    capsys)
    assert got == code and message in err.splitlines()[-1] and "Traceback" not in err
    assert _snapshot(finished_ham_run) == before


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name, data in _snapshot(src).items():
        (dst / name).write_bytes(data)
    return dst


def _truncate(folder: Path) -> None:
    path = folder / CHECKPOINT
    path.write_bytes(path.read_bytes()[:100])


RUNTIME = [  # (script, extra argv, how to spoil the run folder first, message)
    ("ham", ["--resume", "--rank", "4"], None, "was made with --rank 8, not 4"),
    ("ham", ["--resume", "--tasks", "4"], None, "was made with --tasks 2, not 4"),
    ("ham", ["--resume", "--backbone", "vit_small_cifar"], None, "was made with --backbone vit_nano, not vit_small_cifar"),
    ("treelora", ["--resume"], None, "is a checkpoint of ham, not treelora"),
    ("trm", ["--resume"], None, "is a checkpoint of ham, not trm"),
    ("ham", ["--resume"], _truncate, "is corrupt or truncated; delete it to start afresh"),
    ("ham", [], None, "already holds a checkpoint; pass --resume"),
]


@pytest.mark.parametrize("script,argv,spoil,message", RUNTIME, ids=[" ".join([s, *a]) for s, a, _, _ in RUNTIME])
def test_bad_run_folder_exits_cleanly_and_touches_nothing(script, argv, spoil, message, finished_ham_run, tmp_path,
                                                          capsys):
    out = _copy_run(finished_ham_run, tmp_path / "run")
    if spoil:
        spoil(out)
    before = _snapshot(out)
    code, err = _run(script, TINY + ["--tasks", "2", "--epochs", "1", "--out", str(out), *argv], capsys)
    assert code == 1 and "\n" not in err and message in err and "Traceback" not in err
    assert _snapshot(out) == before


def test_weights_of_the_wrong_shape_exit_cleanly(tmp_path, capsys):
    small = ViT(PRESETS["vit_small_cifar"], 100).state_dict()
    torch.save({k: v for k, v in small.items() if not k.startswith("blocks.")}, tmp_path / "small.pt")
    (tmp_path / "run").mkdir()
    code, err = _run("ham", TINY + ["--weights", str(tmp_path / "small.pt"), "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "\n" not in err
    assert "the weights give cls_token the shape (1, 1, 192), but this ViT needs (1, 1, 48)" in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(64))
    code, err = _run("ham", TINY + ["--weights", str(garbage), "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "garbage.pt is corrupt or truncated" in err and "Error" not in err


def test_gpu_out_of_memory_names_the_batch_size_to_try(tmp_path, monkeypatch, capsys):
    def out_of_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(continual, "train_task", out_of_memory)
    code, err = _run("ham", TINY + ["--out", str(tmp_path)], capsys)
    assert code == 1 and "\n" not in err and "--batch-size 16; try --batch-size 8 with --resume" in err


def test_a_flag_newer_than_the_checkpoint_holds_its_default(finished_ham_run, tmp_path, capsys):
    """A checkpoint written before a flag existed resumes under the flag's default (the behaviour it had then),
    and is refused under any other value."""
    out = _copy_run(finished_ham_run, tmp_path / "run")
    state = torch.load(out / CHECKPOINT, weights_only=True)
    del state["config"]["adapter_init"]
    torch.save(state, out / CHECKPOINT)
    argv = TINY + ["--tasks", "2", "--epochs", "1", "--out", str(out), "--resume"]
    assert ham.main(argv)["finished"]
    code, err = _run("ham", [*argv, "--adapter-init", "shared"], capsys)
    assert code == 1 and "was made with --adapter-init fresh, not shared" in err


def test_a_checkpoint_older_than_a_changed_default_holds_the_value_it_ran_with(finished_ham_run, tmp_path, capsys):
    """--draws was added with 1 and now defaults to 10: a checkpoint without it ran with one draw, so it resumes
    under --draws 1 and is refused under the new default."""
    out = _copy_run(finished_ham_run, tmp_path / "run")
    state = torch.load(out / CHECKPOINT, weights_only=True)
    del state["config"]["draws"]
    torch.save(state, out / CHECKPOINT)
    argv = TINY + ["--tasks", "2", "--epochs", "1", "--out", str(out), "--resume"]
    code, err = _run("ham", argv, capsys)
    assert code == 1 and "was made with --draws 1, not 10" in err
    assert ham.main([*argv, "--draws", "1"])["finished"]
