"""flags.py: every flag's check is one sentence, --help documents every flag once, --precision auto."""
import subprocess
import sys

import pytest
import torch

import flags
from conftest import HERE
from flags import CLArgs

BAD_FLAGS = [
    (["--tasks", "7"], "--tasks must divide the 100 classes of cifar100"),
    (["--tasks", "1"], "--tasks must divide the 100 classes of cifar100"),
    (["--tasks", "ten"], "invalid int value"),
    (["--targets", "qkv,foo"], "--targets must be"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lora-alpha", "0"], "--lora-alpha must be a positive number"),
    (["--train-per-class", "-1"], "--train-per-class must be at least 0"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295"),
    (["--seed", "99999999999999999999"], "--seed must be between 0 and 4294967295"),
    (["--class-seed", "-1"], "--class-seed must be between 0 and 4294967295"),
    (["--img-size", "-8"], "--img-size must be at least 0"),
    (["--heads", "-1"], "--heads must be at least 0"),
    (["--weights", "/no/such/file.pt"], "no such file"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--dataset", "folder", "--data-root", "/no/such/folder"], "holds no train/ folder"),
    (["--backbone", "resnet"], "invalid choice"),
    (["--normalize", "zscore"], "--normalize zscore is not auto, imagenet, 0.5 or three means"),
    (["--normalize", "0.5,0.5,0.5/1,0,1"], "three positive stds"),
    (["--device", "tpu"], "--device tpu"),
    (["--device", "foo"], "--device foo is not a device"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_gives_one_sentence(argv, message, usage_error):
    assert message in usage_error(CLArgs, argv)


def test_unwritable_out_is_refused(tmp_path, usage_error):
    (tmp_path / "file").write_text("x")
    assert "cannot be written" in usage_error(CLArgs, ["--out", str(tmp_path / "file" / "run")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(usage_error):
    assert "use --device cpu" in usage_error(CLArgs, ["--device", "cuda"])


@pytest.mark.parametrize("script", ["ham", "treelora", "trm"])
def test_help_documents_every_flag_once(script):
    text = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=HERE, capture_output=True, text=True).stdout
    module = __import__(script)
    for f in flags.fields(module.Args):
        assert "--" + f.name.replace("_", "-") in text
    assert "--no-resume" not in text and "(default: )" not in text and "(default: empty)" in text
    assert text.count("(default: 0.0001)") == 1  # --lr, once


def test_precision_auto_follows_the_device_and_the_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert flags.bf16_autocast("auto", cuda) and not flags.bf16_autocast("fp32", cuda)
    assert flags.bf16_autocast("bf16", cpu) and not flags.bf16_autocast("fp32", cpu)
    monkeypatch.setattr(flags, "cpu_has_bf16", lambda: False)
    assert not flags.bf16_autocast("auto", cpu)
    monkeypatch.setattr(flags, "cpu_has_bf16", lambda: True)
    assert flags.bf16_autocast("auto", cpu)
