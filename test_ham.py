"""ham.py against references: torchvision's ViT, dense LoRA algebra, hand-made metrics, the CIFAR format."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import ham
from conftest import write_cifar100_pickles

HERE = Path(__file__).parent


def _ours_from_torchvision(tv: torchvision.models.VisionTransformer, cfg: ham.ViTConfig) -> ham.ViT:
    ours = ham.ViT(cfg, num_classes=tv.heads.head.out_features)
    ours.load_state_dict(ham.timm_names_from_torchvision(tv.state_dict()), strict=True)
    return ours.eval()


def _randomise_head_(tv: torchvision.models.VisionTransformer) -> None:
    torch.nn.init.normal_(tv.heads.head.weight, std=0.05)  # torchvision zero-initialises it
    torch.nn.init.normal_(tv.heads.head.bias, std=0.05)


def test_vit_b_16_matches_torchvision():
    torch.manual_seed(0)
    tv = torchvision.models.vit_b_16().eval()
    _randomise_head_(tv)
    ours = _ours_from_torchvision(tv, ham.BACKBONES["vit_b_16"])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, got = tv(x), ours(x)
    assert want.abs().max() > 0.1  # a real comparison, not of zeros
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_small_vit_matches_torchvision():
    torch.manual_seed(1)
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                              hidden_dim=48, mlp_dim=96, num_classes=100).eval()
    _randomise_head_(tv)
    ours = _ours_from_torchvision(tv, ham.BACKBONES["vit_nano"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=0)


def _lora_model(seed: int = 0) -> tuple[ham.ViT, list[ham.LoRALinear]]:
    torch.manual_seed(seed)
    model = ham.ViT(ham.BACKBONES["vit_nano"]).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    layers = ham.add_lora_(model, ["qkv", "fc2"], rank=4, lora_alpha=8.0)
    return model, layers


def test_fresh_adapter_changes_nothing():
    torch.manual_seed(0)
    plain = ham.ViT(ham.BACKBONES["vit_nano"]).eval()
    torch.nn.init.normal_(plain.head.weight, std=0.1)
    model, layers = _lora_model(0)
    assert all(layer.B.abs().sum() == 0 and layer.A.abs().sum() > 0 for layer in layers)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)


def test_fold_equals_unfolded_forward():
    model, layers = _lora_model(0)
    for layer in layers:
        torch.nn.init.normal_(layer.B, std=0.2)
    layers[0].importance = torch.nn.Parameter(torch.tensor(0.7))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        expected_w = layers[0].base.weight + 0.7 * (8.0 / 4) * layers[0].B @ layers[0].A  # dense reference
        for layer in layers:
            layer.fold_()
        after = model(x)
    assert all(layer.B.abs().sum() == 0 for layer in layers)
    torch.testing.assert_close(layers[0].base.weight, expected_w)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert (after - model.eval()(x)).abs().max() == 0


def test_strip_lora_keeps_outputs_and_removes_adapters():
    model, layers = _lora_model(0)
    for layer in layers:
        torch.nn.init.normal_(layer.B, std=0.2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for layer in layers:
            layer.fold_()
        ham.strip_lora_(model)
        after = model(x)
    assert not ham.lora_layers(model)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_lora_trains_only_adapters_and_head():
    model, _ = _lora_model(0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith((".A", ".B")) or n.startswith("head.")}
    assert len([n for n in trainable if n.endswith(".A")]) == 2 * 2  # qkv and fc2 of 2 blocks


def test_class_order_is_the_pycil_one():
    assert ham.class_order(1993)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert sorted(ham.class_order(5)) == list(range(100)) and ham.class_order(5) != ham.class_order(1993)


def test_cifar_reader_reads_original_format(tmp_path):
    folder = write_cifar100_pickles(tmp_path, train_per_class=2, test_per_class=1)
    with open(folder / "train", "rb") as f:
        original = pickle.load(f, encoding="bytes")
    got = ham.read_cifar100(folder)
    assert got["train_x"].shape == (200, 3, 32, 32) and got["train_x"].dtype == torch.uint8
    assert got["test_x"].shape == (100, 3, 32, 32)
    assert got["train_y"].tolist() == original[b"fine_labels"]
    # CIFAR stores each image as 1024 red, then 1024 green, then 1024 blue bytes, rows first
    assert got["train_x"][5, 1, 3, 7].item() == original[b"data"][5, 1024 + 3 * 32 + 7]
    assert got["class_names"][3] == "class_3"


def test_cifar_reader_refuses_tampered_pickle(tmp_path):
    folder = write_cifar100_pickles(tmp_path, train_per_class=1, test_per_class=1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(ham.UserError, match=r"\.exec, which a CIFAR-100 file never does; refusing to unpickle"):
        ham.read_cifar100(folder)
    assert not marker.exists()


def test_cifar_reader_rejects_wrong_structure(tmp_path):
    folder = write_cifar100_pickles(tmp_path, train_per_class=1, test_per_class=1)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": [1, 2, 3]}, f, protocol=2)
    with pytest.raises(ham.UserError, match="no uint8 'data' array"):
        ham.read_cifar100(folder)


def test_split_relabels_by_class_order():
    raw = ham.make_synthetic(0, train_per_class=3, test_per_class=2)
    order = ham.class_order(1993)
    data = ham.split_data(raw, order=order, tasks=10, train_per_class=2, device=torch.device("cpu"))
    assert len(data.train_y) == 200 and torch.bincount(data.train_y).tolist() == [2] * 100
    # relabelled class 0 is original class 68, so its images are class 68's
    first = (raw["train_y"] == 68).nonzero()[0, 0]
    assert torch.equal(data.train_x[(data.train_y == 0).nonzero()[0, 0]], raw["train_x"][first])
    assert set(data.train_y[data.train_indices(3)].tolist()) == set(range(30, 40))


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    oy, ox = torch.randint(0, 9, (2, 5), generator=g)
    flip = torch.tensor([True, False, True, False, False])
    got = ham.crop_flip(x, oy, ox, flip, pad=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(5):
        want = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        assert torch.equal(got[i], want.flip(2) if flip[i] else want)


def test_metrics_on_hand_made_matrix():
    acc = [[90.0, None, None],
           [70.0, 80.0, None],
           [60.0, 75.0, 85.0]]
    m = ham.cl_metrics(acc)
    assert m["A_t"] == pytest.approx([90.0, 75.0, 220 / 3])
    assert m["A_last"] == pytest.approx(220 / 3)
    assert m["A_avg"] == pytest.approx((90 + 75 + 220 / 3) / 3)
    # forgetting: task 0 max(90, 70) - 60 = 30; task 1 max(80) - 75 = 5 -> 17.5
    assert m["forgetting"] == pytest.approx(17.5)
    # BWT: (60 - 90 + 75 - 80) / 2 = -17.5
    assert m["BWT"] == pytest.approx(-17.5)
    assert ham.cl_metrics(acc, sizes=[1, 1, 2])["A_t"][2] == pytest.approx((60 + 75 + 2 * 85) / 4)


def test_forgetting_uses_the_best_earlier_accuracy():
    acc = [[50.0, None, None], [80.0, 60.0, None], [40.0, 70.0, 90.0]]
    m = ham.cl_metrics(acc)
    assert m["forgetting"] == pytest.approx(((80 - 40) + (60 - 70)) / 2)
    assert m["BWT"] == pytest.approx(((40 - 50) + (70 - 60)) / 2)


def test_weights_file_round_trip_and_shape_error(tmp_path):
    torch.manual_seed(0)
    src = ham.ViT(ham.BACKBONES["vit_nano"])
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = ham.ViT(ham.BACKBONES["vit_nano"])
    ham.load_backbone_weights_(dst, str(tmp_path / "w.pt"), "vit_nano")
    for name, value in src.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(dst.state_dict()[name], value), name
    wrong = ham.ViT(ham.BACKBONES["vit_small_cifar"])
    with pytest.raises(ham.UserError, match="shape .* but vit_small_cifar needs"):
        ham.load_backbone_weights_(wrong, str(tmp_path / "w.pt"), "vit_small_cifar")


def test_missing_network_for_imagenet_weights(monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "vit_b_16", offline)
    with pytest.raises(ham.UserError, match="--weights PATH.*vit_small_cifar"):
        ham.load_backbone_weights_(ham.ViT(ham.BACKBONES["vit_nano"]), "auto", "vit_b_16")


def test_missing_cifar_without_network(monkeypatch, tmp_path, capsys):
    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(SystemExit) as e:
        ham.main_guard(lambda: ham.main(["--data-root", str(tmp_path), "--backbone", "vit_nano",
                                         "--out", str(tmp_path / "run")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err
    assert "--data-root" in err and "--dataset synthetic" in err


BAD_FLAGS = [
    (["--tasks", "7"], "--tasks must divide 100"),
    (["--tasks", "1"], "--tasks must divide 100"),
    (["--tasks", "ten"], "invalid int value"),
    (["--density", "0"], "--density must be in (0, 1]"),
    (["--density", "1.5"], "--density must be in (0, 1]"),
    (["--groups", "0"], "--groups must be at least 1"),
    (["--threshold", "2"], "--threshold is a cosine"),
    (["--merge", "max"], "invalid choice"),
    (["--targets", "qkv,foo"], "--targets must be"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lora-alpha", "0"], "--lora-alpha must be a positive number"),
    (["--train-per-class", "-1"], "--train-per-class must be at least 0"),
    (["--weights", "/no/such/file.pt"], "no such file"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--backbone", "resnet"], "invalid choice"),
    (["--device", "tpu"], "--device tpu"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_gives_one_sentence(argv, message, usage_error):
    assert message in usage_error(ham.Args, argv)


def test_unwritable_out_is_refused(tmp_path, usage_error):
    (tmp_path / "file").write_text("x")
    assert "cannot be written" in usage_error(ham.Args, ["--out", str(tmp_path / "file" / "run")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(usage_error):
    assert "use --device cpu" in usage_error(ham.Args, ["--device", "cuda"])


def test_help_documents_every_flag():
    text = subprocess.run([sys.executable, "ham.py", "--help"], cwd=HERE, capture_output=True, text=True).stdout
    for f in ham.fields(ham.Args):
        assert "--" + f.name.replace("_", "-") in text


TINY = ["--backbone", "vit_nano", "--tasks", "5", "--epochs", "2", "--batch-size", "32", "--train-per-class", "24"]


def _run_script(tmp_path: Path, *argv: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "ham.py", *TINY, "--out", str(tmp_path / "run"), *argv],
                          cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / "run" / "results.json").read_text()), proc.stdout


def test_end_to_end_on_cifar_format_files(tmp_path):
    write_cifar100_pickles(tmp_path / "data", train_per_class=24, test_per_class=4)
    results, stdout = _run_script(tmp_path, "--data-root", str(tmp_path / "data"))
    assert results["finished"] and not results["synthetic_data"]
    assert results["class_order"][:3] == [68, 56, 78]
    assert len(results["accuracy_matrix"]) == 5 and results["accuracy_matrix"][0][1] is None
    assert results["metrics"]["A_last"] > 2 * 1.0  # chance is 1% over 100 classes
    assert len(results["groups"]) <= 5 and sorted(sum(results["groups"], [])) == list(range(5))
    assert "synthetic" not in stdout


def test_end_to_end_synthetic(tmp_path):
    results, stdout = _run_script(tmp_path, "--dataset", "synthetic", "--groups", "2")
    assert results["finished"] and results["synthetic_data"]
    assert results["metrics"]["A_last"] > 2 * 1.0
    assert len(results["groups"]) == 2 and sorted(sum(results["groups"], [])) == list(range(5))
    assert all(line.startswith("[synthetic data]") for line in stdout.splitlines())
    assert results["trainable_params"] > 0 and results["stored_params"] > 0
    for key in ("config", "accuracy_matrix", "metrics", "wall_seconds", "peak_host_rss_bytes", "tasks"):
        assert key in results


def test_cpu_run_is_repeatable(tmp_path):
    args = TINY + ["--dataset", "synthetic", "--tasks", "2", "--epochs", "1"]
    a = ham.main(args + ["--out", str(tmp_path / "a")])
    b = ham.main(args + ["--out", str(tmp_path / "b")])
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert [t["importance"] for t in a["tasks"]] == [t["importance"] for t in b["tasks"]]


def test_no_merge_ablation_gives_every_task_its_group(tmp_path):
    r = ham.main(TINY + ["--dataset", "synthetic", "--epochs", "1", "--groups", "5", "--out", str(tmp_path)])
    assert r["groups"] == [[0], [1], [2], [3], [4]]
