"""The GPU path's code on the CPU: compiled blocks against eager (the methods' hooks, a resumed run), host syncs
recorded by call site, and the GPU check's verdict. No test needs a GPU; bench.py --gpu-check runs the real thing."""
import functools
import warnings
from pathlib import Path

import pytest
import torch

import bench
import continual
import ham
import treelora
import trm
from conftest import TINY, interrupt_evaluation

SCRIPTS = {"ham": (ham, ["--groups", "1"]), "treelora": (treelora, ["--grad-density", "0.5"]),
           "trm": (trm, ["--merge-steps", "3"])}
SHORT = [*TINY, "--tasks", "4", "--epochs", "1", "--train-per-class", "4", "--test-per-class", "4",
         "--classifier", "ridge", "--rp-dim", "32"]


@pytest.fixture
def compiled_on_the_cpu(monkeypatch):
    """--compile default with the aot_eager backend: dynamo and AOTAutograd capture the blocks as on a GPU (hooks,
    guards, recompiles), without inductor's C++ build, so the result must equal eager's."""
    monkeypatch.setattr(continual, "compile_blocks_", functools.partial(continual.compile_blocks_,
                                                                        backend="aot_eager"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _checkpoint(out: Path) -> dict:
    return torch.load(out / continual.CHECKPOINT, weights_only=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_compiled_blocks_train_as_eager_does(script, tmp_path, compiled_on_the_cpu):
    module, extra = SCRIPTS[script]
    eager = module.main([*SHORT, *extra, "--compile", "off", "--out", str(tmp_path / "eager")])
    compiled = module.main([*SHORT, *extra, "--compile", "default", "--out", str(tmp_path / "compiled")])
    assert eager["compiled_blocks"] == "off" and compiled["compiled_blocks"] == "default"
    assert compiled["accuracy_matrix"] == eager["accuracy_matrix"]
    a, b = _checkpoint(tmp_path / "compiled")["model"], _checkpoint(tmp_path / "eager")["model"]
    assert a.keys() == b.keys()
    for k in b:  # the trained adapters, merged weights and head: the same up to rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_compiled_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, compiled_on_the_cpu):
    argv = [*SHORT, *SCRIPTS["trm"][1], "--compile", "default"]
    reference = trm.main([*argv, "--out", str(tmp_path / "reference")])
    restore = interrupt_evaluation(monkeypatch, at=3)  # a Ctrl-C during the third task's evaluation
    with pytest.raises(continual.Interrupted):
        trm.main([*argv, "--out", str(tmp_path / "killed")])
    restore()
    assert len(_checkpoint(tmp_path / "killed")["accuracy_matrix"]) == 2
    resumed = trm.main([*argv, "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    a, b = _checkpoint(tmp_path / "killed"), _checkpoint(tmp_path / "reference")
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bit for bit, as an eager run resumes
    assert all(torch.equal(x, y) for x, y in zip(a["method_state"]["merged"], b["method_state"]["merged"]))


def test_compile_is_off_on_the_cpu_unless_asked():
    model = bench.lora_vit(continual.PRESETS["vit_nano"], torch.device("cpu"))
    assert continual.compile_blocks_(model, "auto", torch.device("cpu")) == "off"
    assert continual.compile_blocks_(model, "off", torch.device("meta")) == "off"
    assert continual.adam([{"params": [torch.nn.Parameter(torch.zeros(2))]}], 0.1,
                          torch.device("cpu")).defaults["fused"] is None  # fused on CUDA only


def _asks_for_a_sync():
    warnings.warn("called a synchronizing CUDA operation")  # what torch's sync debug mode warns, from C++


def test_host_syncs_are_counted_by_call_site(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    sites: dict[str, int] = {}
    with continual.host_syncs_recorded(sites, True):
        for _ in range(3):
            _asks_for_a_sync()
        with pytest.warns(UserWarning, match="unrelated"):  # other warnings pass through untouched
            warnings.warn("unrelated")
    assert modes == ["warn", "default"]  # debug mode on for the steps only
    (site, count), = sites.items()
    assert count == 3 and site.startswith("test_gpu_paths.py:") and "_asks_for_a_sync" in site.split(" <- ")[0]
    with continual.host_syncs_recorded(sites, False):  # not enabled: the mode untouched, nothing recorded
        with pytest.warns(UserWarning, match="synchronizing"):
            _asks_for_a_sync()
    assert modes == ["warn", "default"] and sum(sites.values()) == 3


def test_the_gpu_check_fails_when_a_run_fails(tmp_path):
    """Every command of the check stops at its flags (--epochs 0): the check must say FAILED and not pass."""
    lines, ok = bench.gpu_check(tmp_path, [*TINY, "--tasks", "2", "--epochs", "0"], ["--device", "cpu"])
    assert not ok
    assert sum("FAILED" in line for line in lines) == 6  # five commands, and the kill and resume
