"""continual.py: data formats, the split, augmentation, metrics, the loop's masking and evaluation, run folders."""
import json
import pickle

import pytest
import torch
import torch.nn.functional as F

import continual
import flags
from data import class_order, make_synthetic, read_cifar100, read_image_folder, split_data
from conftest import TINY, learned, write_cifar100_pickles
from continual import UserError
from flags import CLArgs
from lora_vit import PRESETS, ViT, add_lora_, lora_layers, lora_parameters


class FineTune(continual.Method):
    """The simplest method the loop can drive: one LoRA trained on every task in turn (SeqLoRA)."""

    def __init__(self, model, args):
        self.model = model

    def begin_task(self, task, batches):
        return [*lora_parameters(lora_layers(self.model)), *self.model.head.parameters()]


def run(tmp_path, *argv: str) -> dict:
    args = flags.parse_args(CLArgs, [*TINY, "--out", str(tmp_path), *argv])
    return continual.run_continual(args, FineTune, "finetune")


# ---- data


def test_class_order_is_the_pycil_one():
    assert class_order(1993)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert sorted(class_order(5)) == list(range(100)) and class_order(5) != class_order(1993)


def test_cifar_reader_reads_original_format(tmp_path):
    folder = write_cifar100_pickles(tmp_path, train_per_class=2, test_per_class=1)
    with open(folder / "train", "rb") as f:
        original = pickle.load(f, encoding="bytes")
    got = read_cifar100(folder)
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
    with pytest.raises(UserError, match=r"asks to load __builtin__\.exec, which a CIFAR-100 file never does; refusing"):
        read_cifar100(folder)
    assert not marker.exists()


def test_truncated_cifar_file_is_called_corrupt_or_truncated(tmp_path):
    folder = write_cifar100_pickles(tmp_path, train_per_class=1, test_per_class=1)
    data = (folder / "train").read_bytes()
    (folder / "train").write_bytes(data[: len(data) // 2])  # a half-finished download
    with pytest.raises(UserError, match=r"train is corrupt or truncated .*delete it to download it again"):
        read_cifar100(folder)


def test_cifar_reader_rejects_wrong_structure(tmp_path):
    folder = write_cifar100_pickles(tmp_path, train_per_class=1, test_per_class=1)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": [1, 2, 3]}, f, protocol=2)
    with pytest.raises(UserError, match="no uint8 'data' array"):
        read_cifar100(folder)


def test_split_relabels_by_class_order():
    raw = make_synthetic(0, train_per_class=3, test_per_class=2)
    data = split_data(raw, order=class_order(1993), tasks=10, train_per_class=2,
                                device=torch.device("cpu"))
    assert len(data.train_y) == 200 and torch.bincount(data.train_y).tolist() == [2] * 100
    first = (raw["train_y"] == 68).nonzero()[0, 0]  # relabelled class 0 is original class 68
    assert torch.equal(data.train_x[(data.train_y == 0).nonzero()[0, 0]], raw["train_x"][first])
    assert set(data.train_y[data.train_indices(3)].tolist()) == set(range(30, 40))


def test_synthetic_images_each_get_their_own_shift():
    raw = make_synthetic(0, train_per_class=20, test_per_class=1)
    x = raw["train_x"][raw["train_y"] == 0].float()  # 20 images of class 0
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    best = set()
    for img in x[1:]:  # the roll that best aligns each image with the first one
        scores = {(dy, dx): (img.roll((dy, dx), (1, 2)) * x[0]).sum().item() for dy in range(-4, 5) for dx in range(-4, 5)}
        best.add(max(scores, key=scores.get))
    assert len(best) >= 5  # one shift per split would align every image at the same roll


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    oy, ox = torch.randint(0, 9, (2, 5), generator=g)
    flip = torch.tensor([True, False, True, False, False])
    got = continual.crop_flip(x, oy, ox, flip, pad=4)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(5):
        want = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        assert torch.equal(got[i], want.flip(2) if flip[i] else want)


def test_normalisations():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    half = continual.to_model_input(x, 4, "0.5")
    assert torch.equal(half[0], torch.full((3, 4, 4), -1.0)) and torch.equal(half[1], torch.full((3, 4, 4), 1.0))
    imagenet = continual.to_model_input(x, 8, "imagenet")
    assert imagenet.shape == (2, 3, 8, 8)
    torch.testing.assert_close(imagenet[0, :, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))


def _write_png_tree(root, classes: int, train: int, test: int, size: int = 20):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class_{chr(ord('a') + c)}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = torch.full((3, size, size), 40 * c, dtype=torch.uint8)
                img[c % 3] = torch.randint(0, 256, (size, size), dtype=torch.uint8, generator=g)
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def test_folder_dataset_reads_a_png_tree(tmp_path):
    _write_png_tree(tmp_path, classes=4, train=3, test=2)
    (tmp_path / "train" / "class_a" / "notes.txt").write_text("not an image, not an image suffix: skipped")
    raw = read_image_folder(tmp_path, img_size=224)
    assert raw["class_names"] == ["class_a", "class_b", "class_c", "class_d"]
    # stored at their own 20 px, not at the 224 px input (150 KB an image): the loop resizes each batch
    assert raw["train_x"].shape == (12, 3, 20, 20) and raw["train_x"].dtype == torch.uint8
    assert raw["train_y"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and raw["test_x"].shape == (8, 3, 20, 20)
    assert (raw["train_x"][3:6, [0, 2]] == 40).all()  # class b's constant channels, exactly
    assert continual.to_model_input(raw["train_x"][:2], 224, "imagenet").shape == (2, 3, 224, 224)


def test_folder_images_are_stored_no_larger_than_the_input(tmp_path):
    from PIL import Image
    _write_png_tree(tmp_path, classes=2, train=1, test=1, size=20)
    Image.new("RGB", (48, 40), (200, 10, 10)).save(tmp_path / "train" / "class_a" / "big.png")
    raw = read_image_folder(tmp_path, img_size=32)
    assert raw["train_x"].shape == (3, 3, 32, 32)  # the largest side is 48: bounded by the 32 px input
    big = raw["train_x"][1]  # sorted names: 0.png, big.png
    assert (big[0] == 200).all() and (big[1] == 10).all()


def test_folder_dataset_names_every_unreadable_image(tmp_path):
    _write_png_tree(tmp_path, classes=2, train=2, test=1)
    for name in ("train/class_a/broken.png", "test/class_b/empty.jpg"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match=r"2 file\(s\) cannot be read as images: .*broken\.png, .*empty\.jpg\."):
        read_image_folder(tmp_path, img_size=16)


def test_folder_dataset_needs_the_same_classes_in_test(tmp_path):
    _write_png_tree(tmp_path, classes=2, train=1, test=1)
    (tmp_path / "train" / "class_z").mkdir()
    with pytest.raises(UserError, match="must hold the same class folders"):
        read_image_folder(tmp_path, img_size=16)


def test_folder_dataset_end_to_end(tmp_path):
    _write_png_tree(tmp_path / "data", classes=4, train=6, test=2)
    r = continual.run_continual(flags.parse_args(CLArgs, [
        "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--backbone", "vit_nano", "--weights", "random",
        "--tasks", "2", "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run")]), FineTune, "finetune")
    assert r["finished"] and len(r["class_order"]) == 4 and r["vit"]["img_size"] == 32
    assert sorted(r["class_names"]) == ["class_a", "class_b", "class_c", "class_d"]
    with pytest.raises(UserError, match=r"--tasks 3 does not divide the 4 classes .*use one of 2, 4"):
        continual.run_continual(flags.parse_args(CLArgs, [
            "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--backbone", "vit_nano", "--tasks", "3",
            "--out", str(tmp_path / "run3")]), FineTune, "finetune")
    assert not (tmp_path / "run3").exists()  # failed before its first task: nothing left behind


# ---- metrics


def test_metrics_on_hand_made_matrix():
    acc = [[90.0, None, None],
           [70.0, 80.0, None],
           [60.0, 75.0, 85.0]]
    m = continual.cl_metrics(acc)
    assert m["A_t"] == pytest.approx([90.0, 75.0, 220 / 3])
    assert m["A_last"] == pytest.approx(220 / 3)
    assert m["A_avg"] == pytest.approx((90 + 75 + 220 / 3) / 3)
    assert m["forgetting"] == pytest.approx(17.5)  # task 1: max(90, 70) - 60 = 30; task 2: 80 - 75 = 5
    assert m["BWT"] == pytest.approx(-17.5)  # (60 - 90 + 75 - 80) / 2
    assert continual.cl_metrics(acc, sizes=[1, 1, 2])["A_t"][2] == pytest.approx((60 + 75 + 2 * 85) / 4)


def test_forgetting_uses_the_best_earlier_accuracy():
    acc = [[50.0, None, None], [80.0, 60.0, None], [40.0, 70.0, 90.0]]
    m = continual.cl_metrics(acc)
    assert m["forgetting"] == pytest.approx(((80 - 40) + (60 - 70)) / 2)
    assert m["BWT"] == pytest.approx(((40 - 50) + (70 - 60)) / 2)


# ---- the loop


def _model_and_data(tasks: int = 5):
    torch.manual_seed(0)
    model = ViT(PRESETS["vit_nano"], num_classes=100)
    add_lora_(model, ["qkv"], rank=4, lora_alpha=4.0)
    data = split_data(make_synthetic(0, 4, 2), order=class_order(1993), tasks=tasks,
                                train_per_class=4, device=torch.device("cpu"))
    return model, data


def test_only_the_current_tasks_head_rows_get_a_gradient():
    model, data = _model_and_data()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    gen, device_gen = continual.run_generators(0, torch.device("cpu"))
    batches = continual.TaskBatches(data, 2, batch_size=16, img_size=32, normalize="imagenet", gen=gen,
                                    device_gen=device_gen)
    x, y = next(iter(batches))
    assert 0 <= y.min() and y.max() < 20  # labels local to the task
    F.cross_entropy(continual.task_logits(model, x, batches.classes), y).backward()
    rows = model.head.weight.grad.abs().sum(1)
    assert (rows[40:60] > 0).all() and rows[:40].sum() == 0 and rows[60:].sum() == 0


def test_evaluation_predicts_among_seen_classes_only():
    model, data = _model_and_data()
    kw = dict(batch_size=64, img_size=32, normalize="imagenet", amp=False)
    with torch.no_grad():
        model.head.bias[:40] = torch.linspace(0, 1, 40)  # seen classes: a fixed preference
        before = continual.evaluate(model, data, 2, **kw)
        model.head.bias[40:] = 100.0  # unseen classes would win every argmax if they were candidates
        assert continual.evaluate(model, data, 2, **kw) == before
    correct_class = 39  # the preferred seen class: its test images are right, all others wrong
    assert before[1] == pytest.approx(100.0 / 20) and before[0] == 0.0 and correct_class // 20 == 1


def test_a_run_learns_and_repeats_bit_for_bit(tmp_path):
    argv = ["--tasks", "4", "--epochs", "3", "--train-per-class", "16"]
    a, b = run(tmp_path / "a", *argv), run(tmp_path / "b", *argv)
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and learned(a)
    assert a["out"] == str(tmp_path / "a") and a["config"]["out"] == str(tmp_path / "a")
    text = (tmp_path / "a" / "results.json").read_text()
    assert json.loads(text)["accuracy_matrix"] == a["accuracy_matrix"]
    assert f'"accuracy_matrix": [\n  {json.dumps(a["accuracy_matrix"][0])},' in text  # one row per line


def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = {continual.default_out(flags.parse_args(CLArgs, argv), "ham") for argv in
             ([], ["--tasks", "20"], ["--seed", "1"], ["--dataset", "synthetic"], ["--rank", "4"])}
    assert len(names) == 5 and all(str(n).startswith("runs/ham-") for n in names)
    same = flags.parse_args(CLArgs, ["--device", "cpu", "--batch-size", "7"])  # free on resume: same folder
    assert continual.default_out(same, "ham") == continual.default_out(flags.parse_args(CLArgs, []), "ham")


def test_resume_without_a_checkpoint_stops(tmp_path):
    with pytest.raises(UserError, match=r"--resume: .*holds no checkpoint.pt; check --out, or drop --resume"):
        run(tmp_path / "typo", "--resume")
    assert not (tmp_path / "typo").exists()


def test_interrupt_says_what_was_kept(tmp_path, monkeypatch):
    real, calls = continual.train_task, []

    def interrupted_in_task_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(continual, "train_task", interrupted_in_task_2)
    with pytest.raises(continual.Interrupted, match=r"holds the 1 finished task\(s\): rerun .* with --resume"):
        run(tmp_path, "--tasks", "2", "--epochs", "1", "--train-per-class", "2")
    assert (tmp_path / "log.txt").read_text().endswith("interrupted\n")


def test_error_is_logged_in_the_run_folder(tmp_path, monkeypatch):
    def bad_step(*a, **k):
        raise UserError("something the user can fix")

    monkeypatch.setattr(continual, "evaluate_heads", bad_step)
    with pytest.raises(UserError):
        run(tmp_path, "--tasks", "2", "--epochs", "1", "--train-per-class", "2")
    assert (tmp_path / "log.txt").read_text().endswith("error: something the user can fix\n")


class FakeCuda:
    """torch.cuda on a pretend machine with `count` GPUs: records what set_device is given, then stops the run
    there (before anything touches a real GPU), refusing an unindexed device as torch 2.11 does."""

    class Reached(Exception):
        pass

    def __init__(self, monkeypatch, count=2, current=0):
        self.given = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
            monkeypatch.delenv(var, raising=False)

    def set_device(self, device):
        self.given.append(device)
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        raise self.Reached


@pytest.mark.parametrize("name,env,expected", [
    ("auto", {}, "cuda:0"), ("cuda", {}, "cuda:0"), ("cuda:1", {}, "cuda:1"), ("cpu", {}, "cpu"),
    ("auto", {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "cuda:0"),  # torchrun --nproc_per_node 1
    ("cuda:1", {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "cuda:1"),  # one process: the index given stands
    ("cuda", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1"),  # several: each rank its LOCAL_RANK's GPU
    ("cuda:0", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1"),
])
def test_resolved_cuda_device_always_has_an_index(monkeypatch, name, env, expected):
    FakeCuda(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert continual.resolve_device(name) == torch.device(expected)


def test_resolve_device_takes_the_current_cuda_device(monkeypatch):
    FakeCuda(monkeypatch, current=1)
    assert continual.resolve_device("cuda") == torch.device("cuda:1")


@pytest.mark.parametrize("device,env", [("auto", {}), ("cuda", {}), ("cuda:1", {}),
                                        ("cuda", {"WORLD_SIZE": "1", "LOCAL_RANK": "0", "RANK": "0"})])
def test_a_run_reaches_set_device_with_an_index(tmp_path, monkeypatch, device, env):
    """The path a user types, up to the first call that needs an index: auto and cuda used to reach it unindexed."""
    cuda = FakeCuda(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(FakeCuda.Reached):
        run(tmp_path, "--device", device)
    assert len(cuda.given) == 1 and cuda.given[0].type == "cuda" and cuda.given[0].index is not None


def test_weights_problems_are_one_sentence(tmp_path):
    torch.save(ViT(PRESETS["vit_small_cifar"], 100).state_dict(), tmp_path / "small.pt")
    with pytest.raises(UserError, match=r"--weights .*small.pt: the weights hold blocks.2.norm1.weight, which this ViT has no place for"):
        run(tmp_path / "run", "--weights", str(tmp_path / "small.pt"))
    torch.save({"cls_token": 3}, tmp_path / "dict.pt")
    with pytest.raises(UserError, match=r"dict.pt is not a state dict: its entry 'cls_token' is a int"):
        run(tmp_path / "run", "--weights", str(tmp_path / "dict.pt"))
    assert not (tmp_path / "run").exists()


def test_a_weights_file_sets_the_shape_and_input_size(tmp_path):
    torch.manual_seed(3)
    torch.save(ViT(PRESETS["vit_small_cifar"], 100).state_dict(), tmp_path / "small.pt")
    r = continual.run_continual(flags.parse_args(CLArgs, [
        "--dataset", "synthetic", "--weights", str(tmp_path / "small.pt"), "--img-size", "16", "--tasks", "2",
        "--epochs", "1", "--train-per-class", "2", "--normalize", "0.5", "--out", str(tmp_path / "run")]),
        FineTune, "finetune")
    assert r["vit"] == {"img_size": 16, "patch": 4, "dim": 192, "depth": 6, "heads": 3, "mlp_dim": 768}
    assert r["backbone_weights"] == str(tmp_path / "small.pt") and r["config"]["normalize"] == "0.5"


# ---- the CUDA path's rules, as far as the CPU can show them


def test_normalization_tensors_are_made_once_per_device():
    a = continual.normalization_tensors("imagenet", torch.device("cpu"))
    assert continual.normalization_tensors("imagenet", torch.device("cpu")) is a  # no copy per batch
    meta = continual.normalization_tensors("imagenet", torch.device("meta"))
    assert meta[0].device.type == "meta" and meta is not a
    assert torch.allclose(a[1].flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_evaluation_logits_are_float32(monkeypatch):
    """Features as bf16 autocast returns them; the head must run in fp32, where bf16 would tie two classes and
    argmax would pick the older one."""
    model, data = _model_and_data(tasks=50)  # 2 classes a task
    seen = 1
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[0] = 0.5
        model.head.weight[1] = 0.5
        model.head.weight[1, 0] = 0.5 + 2 ** -11  # logits 24.0 and 24.0117: one bf16 step apart is 0.125
    monkeypatch.setattr(model, "forward_features", lambda x: torch.ones(len(x), 48, dtype=torch.bfloat16))
    acc = continual.evaluate(model, data, seen, batch_size=8, img_size=32, normalize="imagenet", amp=False)
    assert acc == [50.0]  # every image called class 1: right for class 1's half, not tied toward class 0
    bf16 = torch.nn.functional.linear(torch.ones(1, 48, dtype=torch.bfloat16), model.head.weight[:2].bfloat16())
    assert bf16[0, 0] == bf16[0, 1]  # the premise: in bf16 the two logits tie


def test_checkpoints_are_read_onto_the_cpu(tmp_path, monkeypatch):
    import bench
    out = tmp_path / "run"
    r = continual.run_continual(flags.parse_args(CLArgs, [*TINY, "--tasks", "2", "--epochs", "1",
                                                             "--train-per-class", "2", "--out", str(out)]),
                                FineTune, "finetune")
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("map_location")) or real(*a, **kw))
    bench.final_model(out, r["config"], 100)
    args = flags.parse_args(CLArgs, [*TINY, "--tasks", "2", "--epochs", "1", "--train-per-class", "2",
                                         "--normalize", "imagenet", "--out", str(out)])
    continual.load_checkpoint(out / continual.CHECKPOINT, args, "finetune", torch.device("cpu"))
    assert calls == ["cpu", "cpu"]


def test_bf16_runs_train_under_autocast_and_repeat_bit_for_bit(tmp_path, monkeypatch):
    """--precision bf16 on the CPU: the backbone's matmuls run in bf16 (seen by a probe), and a run repeats itself."""
    dtypes = []
    real = continual.task_logits

    def probe(model, x, classes):  # the dtype a block's first linear layer returns
        linear = next(m for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear))
        hook = linear.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        try:
            return real(model, x, classes)
        finally:
            hook.remove()

    monkeypatch.setattr(continual, "task_logits", probe)
    a = run(tmp_path / "a", "--tasks", "2", "--epochs", "1", "--train-per-class", "2", "--precision", "bf16")
    assert set(dtypes) == {torch.bfloat16}
    b = run(tmp_path / "b", "--tasks", "2", "--epochs", "1", "--train-per-class", "2", "--precision", "bf16")
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and "precision: bf16 autocast on cpu" in (tmp_path / "a" / "log.txt").read_text()
