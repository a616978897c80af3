"""data.py's Fashion-MNIST reader against torchvision's, on idx files the tests write in the original format."""
import gzip
import struct

import pytest
import torch

import data
from conftest import TINY, learned, run_script
from flags import CLArgs
from data import (FASHION_MNIST_FILES, UserError, class_order, domain_class_order, domain_task_layout, find_fashion_mnist, first_per_class,
                  load_fashion_mnist, read_fashion_mnist, read_idx, with_domains)


def idx_bytes(t: torch.Tensor) -> bytes:
    """The idx format: 0, 0, type 0x08 (uint8), the number of dimensions, big-endian sizes, the values."""
    return struct.pack(">BBBB", 0, 0, 8, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape) + t.numpy().tobytes()


def fake_fashion_mnist(n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"train_x": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
            "train_y": torch.arange(n_train, dtype=torch.uint8) % 10,
            "test_x": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
            "test_y": torch.arange(n_test, dtype=torch.uint8) % 10}


def write_fashion_mnist(folder, tensors: dict, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in FASHION_MNIST_FILES.items():
        blob = idx_bytes(tensors[key])
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


def test_reader_matches_torchvision(tmp_path):
    """torchvision's FashionMNIST reads the uncompressed files under root/FashionMNIST/raw; ours must agree."""
    import torchvision
    t = fake_fashion_mnist()
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", t, gz=False)
    ours = load_fashion_mnist(str(tmp_path))  # finds torchvision's folder
    for train, split in ((True, "train"), (False, "test")):
        ref = torchvision.datasets.FashionMNIST(str(tmp_path), train=train, download=False)
        assert torch.equal(ours[f"{split}_x"], ref.data[:, None].expand(-1, 3, -1, -1))  # grey -> 3 channels
        assert torch.equal(ours[f"{split}_y"], ref.targets)
    assert ours["class_names"] == torchvision.datasets.FashionMNIST.classes


def test_gzipped_files_in_the_root_read_the_same(tmp_path):
    t = fake_fashion_mnist(seed=3)
    write_fashion_mnist(tmp_path / "plain", t, gz=False)
    write_fashion_mnist(tmp_path / "gz", t, gz=True)  # Debian's package ships them gzipped
    assert all(p.suffix == ".gz" for p in find_fashion_mnist(tmp_path / "gz").values())
    a, b = load_fashion_mnist(str(tmp_path / "plain")), load_fashion_mnist(str(tmp_path / "gz"))
    assert all(torch.equal(a[k], b[k]) for k in ("train_x", "train_y", "test_x", "test_y"))
    assert a["train_x"].shape == (30, 3, 28, 28) and a["train_x"].dtype == torch.uint8
    assert torch.equal(a["train_x"][:, 0], t["train_x"]) and torch.equal(a["train_y"], t["train_y"].long())


def test_bad_idx_files_are_one_sentence(tmp_path):
    t = fake_fashion_mnist()
    blob = idx_bytes(t["train_x"])
    (tmp_path / "short").write_bytes(blob[:-5])
    with pytest.raises(UserError, match=r"short holds 23515 values, not the 23520 of its shape \(30, 28, 28\)"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(b"\x00\x00\x0d\x01" + blob[4:])
    with pytest.raises(UserError, match=r"float is not an idx file of unsigned bytes \(its header is 00000d01\)"):
        read_idx(tmp_path / "float")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(blob)[:40])
    with pytest.raises(UserError, match=r"broken.gz is corrupt or truncated"):
        read_idx(tmp_path / "broken.gz")
    write_fashion_mnist(tmp_path / "mismatch", {**t, "train_y": t["train_y"][:-1]}, gz=False)
    with pytest.raises(UserError, match=r"are not N images and N labels"):
        read_fashion_mnist(find_fashion_mnist(tmp_path / "mismatch"))


def test_offline_and_absent_names_files_folder_and_debian(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(UserError) as e:
        load_fashion_mnist(str(tmp_path))
    message = str(e.value)
    assert "train-images-idx3-ubyte[.gz]" in message and "t10k-labels-idx1-ubyte[.gz]" in message
    assert str(tmp_path) in message and "dataset-fashion-mnist" in message and "/usr/share/datasets/fashion-mnist" in message
    assert len(message.splitlines()) == 1


def test_tasks_must_divide_ten_classes(usage_error, tmp_path):
    write_fashion_mnist(tmp_path, fake_fashion_mnist(), gz=True)
    assert "--tasks must divide the 10 classes of fashion-mnist" in usage_error(
        CLArgs, ["--dataset", "fashion-mnist", "--data-root", str(tmp_path), "--tasks", "3"])


def test_split_keeps_the_first_images_of_each_class():
    raw = data.make_synthetic(0, train_per_class=5, test_per_class=4)
    d = data.split_data(raw, order=data.class_order(1993), tasks=10, train_per_class=3, test_per_class=2,
                        device=torch.device("cpu"))
    assert torch.equal(torch.bincount(d.train_y, minlength=100), torch.full((100,), 3))
    assert torch.equal(torch.bincount(d.test_y, minlength=100), torch.full((100,), 2))
    first_test = (raw["test_y"] == data.class_order(1993)[0]).nonzero().squeeze(1)[:2]
    assert torch.equal(d.test_x[d.test_y == 0], raw["test_x"][first_test])


def test_fashion_mnist_end_to_end(tmp_path):
    import json
    t = fake_fashion_mnist(n_train=200, n_test=50)
    # learnable: each class is its label's brightness, plus the random texture
    for split in ("train", "test"):
        t[f"{split}_x"] = (t[f"{split}_x"] // 4 + 20 * t[f"{split}_y"][:, None, None]).to(torch.uint8)
    write_fashion_mnist(tmp_path / "fm", t, gz=True)
    argv = [*TINY[2:], "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "fm"), "--tasks", "5",
            "--epochs", "2", "--classifier", "align", "--out", str(tmp_path / "run")]
    run_script("ham", argv)
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["finished"] and not r["synthetic_data"] and r["config"]["dataset"] == "fashion-mnist"
    assert len(r["class_order"]) == 10 and learned(r)


# ---- the domain regime: every class in several domains, one domain per task


def test_domains_are_the_same_images_transformed(tmp_path):
    t = fake_fashion_mnist(n_train=40, n_test=20, seed=5)
    write_fashion_mnist(tmp_path, t, gz=True)
    raw = load_fashion_mnist(str(tmp_path))
    four = with_domains(raw, 4, train_per_class=3, test_per_class=2)
    keep = first_per_class(raw["train_y"], 10, 3)
    x, y = raw["train_x"][keep], raw["train_y"][keep]  # (30, 3, 28, 28): classes 0..9, 3 images each
    n = len(y)
    assert torch.equal(four["train_x"][:n], x) and torch.equal(four["train_y"][:n], y)
    assert torch.equal(four["train_x"][n:2 * n], 255 - x)  # inverted
    assert torch.equal(four["train_x"][2 * n:3 * n], x.transpose(2, 3).flip(2))  # 90 degrees counter-clockwise
    assert torch.equal(four["train_x"][3 * n:], x.flip(2).flip(3))  # 180 degrees
    assert torch.equal(four["train_y"][3 * n:], y + 30) and len(four["test_y"]) == 4 * 20
    assert four["class_names"][10] == "T-shirt/top (inverted)" and four["class_names"][39] == "Ankle boot (rotated 180)"


@pytest.mark.parametrize("domains,tasks", [(4, 20), (4, 8), (2, 10), (3, 30)])
def test_domain_order_gives_each_task_one_domain_taking_turns(domains, tasks):
    n, cpt = 10, 10 * domains // tasks
    order = domain_class_order(1993, n, domains, cpt)
    assert sorted(order) == list(range(domains * n))  # every class of every domain once
    for t in range(tasks):
        classes = order[t * cpt:(t + 1) * cpt]
        assert {c // n for c in classes} == {t % domains}  # one domain, in turn: the same domain is `domains` back
    base = class_order(1993, n)
    assert [c % n for c in order[:cpt]] == base[:cpt] and order == domain_class_order(1993, n, domains, cpt)
    # the layout the structure measures read: task t's domain t mod D, and the chunk of base classes it holds
    task_domains, chunks = domain_task_layout(tasks, domains)
    assert task_domains == [t % domains for t in range(tasks)] and chunks == [t // domains for t in range(tasks)]
    for t, chunk in enumerate(chunks):
        assert [c % n for c in order[t * cpt:(t + 1) * cpt]] == base[chunk * cpt:(chunk + 1) * cpt]


def test_domain_flags_are_checked(usage_error):
    assert "use one of 4, 8, 20, 40" in usage_error(CLArgs, ["--dataset", "fashion-mnist", "--domains", "4", "--tasks", "10"])
    assert "--domains must be between 1 (off) and 4" in usage_error(CLArgs, ["--domains", "5"])


def test_domain_regime_end_to_end(tmp_path):
    import json
    t = fake_fashion_mnist(n_train=100, n_test=40)
    write_fashion_mnist(tmp_path / "fm", t, gz=False)
    argv = [*TINY[2:], "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "fm"), "--domains", "4",
            "--tasks", "8", "--epochs", "1", "--train-per-class", "4", "--groups", "3", "--out", str(tmp_path / "run")]
    stdout = run_script("ham", argv).stdout
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["task_domains"] == [0, 1, 2, 3, 0, 1, 2, 3] and len(r["class_order"]) == 40
    assert r["structure"]["ham_groups"]["pairs"] > 0 and "pairs of tasks sharing a HAM group share a domain" in stdout
    joint = [*argv[:-2], "--baseline", "joint", "--out", str(tmp_path / "joint")]  # one task of every domain's class
    run_script("baselines", [a for a in joint if a not in ("--groups", "3")])
    j = json.loads((tmp_path / "joint" / "results.json").read_text())
    assert sorted(j["class_order"]) == list(range(40)) and len(j["accuracy_matrix"]) == 1
