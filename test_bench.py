"""bench.py smoke tests with a tiny budget: the benchmark runs end to end and reports sane numbers.

The benchmark itself is not a test; these only check that its parts run and fit together.
"""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import continual
from data import make_synthetic, split_data
import ham
from lora_vit import ViTConfig, lora_layers

HERE = Path(__file__).parent


def test_method_comparison_runs_every_method(tmp_path):
    proc = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--tasks", "2", "--seeds", "2", "--device",
                           "cpu", "--jobs", "2", "--out", str(tmp_path)],
                          cwd=HERE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["methods"]["rows"]
    assert [r["method"] for r in rows] == list(bench.SETS["methods"])
    for r in rows:
        assert r["seeds"] == 2 and 0 <= r["A_last"][0] <= 100 and r["A_last"][1] >= 0
        assert r["train_seconds"][0] > 0 and r["inference_images_per_second"][0] > 0
    by = {r["method"]: r for r in rows}
    assert by["joint (upper bound) + align"]["forgetting"] is None  # one task: nothing to forget
    assert by["HAM + align"]["stored_params"] > 0 and by["TRM + align"]["stored_params"] > 0
    # a head row beside a run: the run's cost, its own accuracy and stored statistics (ridge: G and Q)
    assert by["HAM + ridge"]["train_seconds"] == by["HAM + align"]["train_seconds"]
    assert by["HAM + ridge"]["stored_params"] != by["HAM + align"]["stored_params"]
    assert "| HAM + align | 2 |" in proc.stdout and " ± " in proc.stdout and (tmp_path / "methods_tiny.md").exists()
    assert "2 job(s) at a time" in proc.stdout
    assert "plot:" in proc.stdout or "matplotlib is not installed" in proc.stdout


def test_final_model_reproduces_the_runs_last_evaluation(tmp_path):
    """The rebuilt, folded and stripped model predicts exactly as the run's last evaluation did."""
    argv = ["--dataset", "synthetic", "--backbone", "vit_nano", "--tasks", "2", "--epochs", "1", "--batch-size", "32",
            "--train-per-class", "8", "--precision", "fp32", "--out", str(tmp_path)]  # the folded model is float32
    r = ham.main(argv)
    model = bench.final_model(tmp_path, r["config"], len(r["class_order"]))
    data = split_data(make_synthetic(0, 8), order=r["class_order"], tasks=2, train_per_class=8,
                                device=torch.device("cpu"))
    assert not lora_layers(model)
    got = continual.evaluate(model, data, 2, batch_size=64, img_size=32, normalize="imagenet", amp=False)
    assert got == r["accuracy_matrix"][-1]


def test_speed_and_growth_run_on_a_tiny_backbone():
    s = bench.speed(torch.device("cpu"), "vit_nano", batch=4, seconds=0.01)
    assert s["peak_flops"] > 0 and 0 < s["lora_step"]["mfu"] < 1 and s["forward_ours_vs_torchvision"] > 0
    assert s["ham_folded_inference_vs_backbone"] > 0 and s["dtype"] == "torch.float32"
    b = bench.speed(torch.device("cpu"), "vit_nano", batch=4, seconds=0.01, amp=True)  # --precision bf16 on the CPU
    assert b["dtype"] == "torch.bfloat16" and b["lora_step"]["images_per_second"] > 0
    cpu = torch.device("cpu")  # the GPU report's measures, on a tiny backbone: each lever, the loop, TRM's merge
    levers = bench.levers(cpu, "vit_nano", 4, seconds=0.01, amp=False, modes=bench.LEVERS[:2],
                          backends=("MATH", "NO_SUCH_KERNEL"), peak=s["peak_flops"])
    assert [r["fused_adam"] for r in levers[:2]] == [False, True] and all(r["images_per_second"] > 0 for r in levers[:3])
    assert "error" in levers[3] and "images_per_second" not in levers[3]  # a lever that fails is a row, not a crash
    loop = bench.loop_images_per_second(cpu, "vit_nano", 32, 8, "auto", amp=False, per_class=2)
    assert loop["compile"] == "off" and loop["images_per_second"] > 0
    merge = bench.merge_against_training(cpu, "vit_nano", 4, snapshots=3, amp=False, per_class=1)
    assert merge["merge_steps"] == 3 and merge["merge_step_vs_train_step"] > 0  # 10 images: batches of 4, 4, 2
    rows = bench.growth(torch.device("cpu"), "vit_nano", task_counts=(2, 3))
    assert rows[0]["trm_stored_bytes"] == rows[1]["trm_stored_bytes"] > 0  # TRM keeps W0 and M only
    assert rows[0]["treelora_stored_bytes"] < rows[1]["treelora_stored_bytes"]  # TreeLoRA keeps one vector per task


def test_vit_flops_match_a_hand_count():
    cfg = ViTConfig(img_size=8, patch=4, dim=2, depth=1, heads=1, mlp_dim=4)  # 4 patches + cls = 5 tokens
    # qkv 2*5*2*6 = 120, QK^T and AV 2*2*5*5*2 = 200, proj 2*5*2*2 = 40, MLP 2*2*5*2*4 = 160; patch 2*4*48*2 = 768
    assert bench.vit_forward_flops(cfg) == 120 + 200 + 40 + 160 + 768


def bench_error(argv, monkeypatch, capsys) -> tuple[int, str]:
    """bench.py's exit code and last line of output for argv, run in this process (a sys.exit sentence, or argparse's
    error line on stderr)."""
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as e:
        bench.main()
    if isinstance(e.value.code, str):  # sys.exit("bench: ..."): Python prints it and exits 1
        return 1, e.value.code
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_flags_are_one_sentence(monkeypatch, capsys):
    for argv, message in ((["--speed", "--device", "foo"], "--device foo is not a device"),
                          (["--preset", "tiny", "--tasks", "7"], "--tasks takes task counts that divide 100"),
                          (["--preset", "tiny", "--jobs", "0"], "--seeds and --jobs must be at least 1"),
                          ([], "choose --preset, --speed, --levers, --search, --gpu-check or --gpu-all"),
                          (["--gpu-check", "--device", "cpu"], "--gpu-check, --gpu-all and --levers need a CUDA"),
                          (["--gpu-all", "--device", "cpu"], "--gpu-check, --gpu-all and --levers need a CUDA"),
                          (["--speed", "--", "--epochs", "2"], "flags after -- go with --preset custom or --gpu-check")):
        code, last = bench_error(argv, monkeypatch, capsys)
        assert code == 2 and message in last, (argv, last)


def test_custom_preset_runs_the_table_on_the_flags_given(tmp_path):
    """--preset custom takes the scripts' shared flags after --: the same rows, runs and files as a preset."""
    proc = subprocess.run([sys.executable, "bench.py", "--preset", "custom", "--set", "methods", "--variants",
                           "frozen + align,frozen + ridge", "--out", str(tmp_path), "--",
                           "--dataset", "synthetic", "--backbone", "vit_nano", "--epochs", "1", "--batch-size", "32",
                           "--train-per-class", "4", "--tasks", "4", "--rp-dim", "16", "--align-epochs", "2"],
                          cwd=HERE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["methods"]["rows"]
    assert [r["method"] for r in rows] == ["frozen + align", "frozen + ridge"] and rows[0]["tasks"] == 4
    run = tmp_path / "runs_custom" / "T4" / "baselines_baseline_frozen_classifier_align" / "seed0" / "results.json"
    r = json.loads(run.read_text())  # one run serves both rows: ridge is kept beside the aligned head
    assert r["config"]["rp_dim"] == 16 and r["config"]["compare_heads"] == "ridge,ncm,ridge0"
    assert rows[1]["A_last"][0] == r["heads"]["ridge"]["metrics"]["A_last"]
    assert (tmp_path / "methods_custom.md").exists()


def test_custom_preset_flags_are_checked_first(monkeypatch, capsys):
    for argv, message in ((["--preset", "custom", "--", "--tasks", "7"], "--tasks must divide the 100 classes"),
                          (["--preset", "custom", "--", "--seed", "3"], "--seed are the bench's own"),
                          (["--preset", "tiny", "--", "--tasks", "4"], "flags after -- go with --preset custom")):
        code, last = bench_error(argv, monkeypatch, capsys)
        assert code != 0 and message in last, (argv, last)


def test_structure_measures_get_their_own_table():
    runs = [{"structure": {"ham_groups": {"same_domain_pairs": p, "pairs": 10, "random_grouping": 0.2}}}
            for p in (0.5, 0.7)]
    row = bench.structure_row(runs)
    assert row["HAM same-domain pairs in a group"] == (60.0, statistics.stdev([50.0, 70.0]))
    assert row["random grouping's"] == (20.0, 0.0) and bench.structure_row([{}]) == {}
    # a run that kept its domains is measured again from its records, whatever its stored measures say
    again = bench.structure_row([{"task_domains": [0, 1, 0, 1], "groups": [[1, 3], [2, 4]], "tasks": [{}] * 4,
                                  "structure": {}}])
    assert again["HAM same-domain pairs in a group"] == (100.0, 0.0)
    base = {"method": "HAM", "tasks": 20, "A_last": (1.0, 0.0), "A_avg": None, "forgetting": None, "BWT": None,
            "train_seconds": (1.0, 0.0), "peak_memory_MiB": (1.0, 0.0), "stored_params": 1,
            "inference_images_per_second": None}
    table = bench.markdown_table([{**base, "structure": row}, {**base, "method": "frozen", "structure": {}}])
    assert "| HAM | 20 | HAM same-domain pairs in a group 60.0 ± 14.1; random grouping's 20.0 |" in table
    assert "| frozen | 20 | HAM" not in table


def test_variants_read_labels_that_hold_commas():
    labels = ["HAM + align", "HAM + align, oracle", "frozen + ridge, M = 0", "SeqLoRA"]
    assert bench.split_variants("HAM + align, oracle,SeqLoRA,HAM + align", labels) == [
        "HAM + align, oracle", "SeqLoRA", "HAM + align"]
    assert bench.split_variants("frozen + ridge, M = 0", labels) == ["frozen + ridge, M = 0"] and \
        bench.split_variants("", labels) == []
    with pytest.raises(ValueError, match="'HAM'"):
        bench.split_variants("HAM,SeqLoRA", labels)
    assert bench.split_variants("HAM + *", labels) == ["HAM + align", "HAM + align, oracle"]
    assert bench.split_variants("SeqLoRA,frozen*", labels) == ["SeqLoRA", "frozen + ridge, M = 0"]
    with pytest.raises(ValueError, match="'TRM\\*'"):
        bench.split_variants("TRM*", labels)


def test_stale_anatomy_by_hand(tmp_path):
    """Two old classes and a new one: the stale means sit 3 and 4 from the oracle's, whose spread is sqrt(tr 2I) =
    sqrt(8) in 4 dimensions, the covariances doubled; the first drift only lengthens its mean (1 -> 4), the second
    is square to its mean (1 -> sqrt 17), so 9 of the 25 squared units of drift are radial. A remedy half way to the
    oracle's means leaves a quarter of the squared drift (75 % explained); the oracle's means with the stale
    covariances explain none of theirs."""
    D = 4
    eye = torch.eye(D).expand(3, D, D)
    stale_means = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
    stale = {"means": stale_means, "factors": eye.clone()}
    oracle_means = torch.tensor([[4.0, 0, 0, 0], [0, 1.0, 4.0, 0], [0, 0, 0, 1.0]])
    oracle = {"means": oracle_means, "factors": 2 ** 0.5 * eye}
    halfway = {"means": (stale_means + oracle_means) / 2, "factors": 2 ** 0.5 * eye}
    torch.save({"classifier": stale, "compare_heads": {"align/oracle": oracle, "align/halfway": halfway,
                "align/oracle-mean": {"means": oracle_means, "factors": eye.clone()}, "ridge": {"G": torch.eye(2)}}},
               tmp_path / "c.pt")
    a = bench.stale_anatomy(tmp_path / "c.pt")
    assert a["drift_in_spread"] == pytest.approx((3 / 8 ** 0.5 + 4 / 8 ** 0.5) / 2)  # tr Sigma_oracle = 8
    assert a["spread_ratio"] == pytest.approx(2.0) and a["cov_drift"] == pytest.approx(1.0)
    assert a["length_ratio"] == pytest.approx((4 + 17 ** 0.5) / 2) and a["radial_share"] == pytest.approx(9 / 25)
    assert a["means explained: halfway"] == pytest.approx(0.75) and a["covariances explained: halfway"] == pytest.approx(1.0)
    assert a["means explained: oracle-mean"] == pytest.approx(1.0)
    assert a["covariances explained: oracle-mean"] == pytest.approx(0.0)
