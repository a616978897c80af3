"""report.py: the structure measures by hand, the pictures or a hint, redrawing a run folder."""
import subprocess
import sys

import continual
import report
from conftest import HERE, TINY
from flags import CLArgs, parse_args
from test_continual import FineTune


def run(tmp_path, *argv: str) -> dict:
    return continual.run_continual(parse_args(CLArgs, [*TINY, "--out", str(tmp_path), *argv]), FineTune, "finetune")


def test_structure_measures_by_hand():
    domains = [0, 1, 0, 1, 0, 1]
    # groups (tasks from 1): {1, 3, 5} all domain 0 -> 3 same pairs; {2, 4} domain 1 -> 1; {6} none: 4 of 4
    m = report.structure_measures(domains, [[1, 3, 5], [2, 4], [6]], [])
    # a random pair of the 6 tasks shares a domain with probability (3*2 + 3*2) / (6*5) = 0.4
    assert m["ham_groups"] == {"same_domain_pairs": 1.0, "pairs": 4, "random_grouping": 0.4}
    # the same groups against base classes 0, 0, 1, 1, 2, 2: no pair shares them; a random pair does 3*2 / 30
    m = report.structure_measures(domains, [[1, 3, 5], [2, 4], [6]], [], classes=[0, 0, 1, 1, 2, 2])
    assert m["ham_groups"]["same_classes_pairs"] == 0 and m["ham_groups"]["random_grouping_classes"] == 0.2
    tasks = [{}, {"selections": [[4], [4]]},  # task 2 (domain 1): 8 picks of task 1 (domain 0)
             {"selections": [[3, 1], [2, 2]]}]  # task 3 (domain 0): task 1 picked 5 times of 8 (same domain)
    p = report.structure_measures(domains, None, tasks)["treelora_picks"]
    assert p["same_domain_share"] == 5 / 16 and p["per_task"] == [0.0, 5 / 8]
    assert p["uniform_pick"] == (8 * 0 + 8 * 0.5) / 16
    # the exhaustive nearest past task per layer (2 layers): task 3 (domain 0) -> tasks 1, 2; task 4 (domain 1)
    # -> tasks 2, 3: same domain 1 of 2 and 1 of 2; uniform: 1/2 of tasks 1-2, 1/3 of tasks 1-3; previous 2 of 4
    tasks = [{}, {}, {"nearest_drift": [0, 1]}, {"nearest_drift": [1, 2]}]
    n = report.structure_measures(domains, None, tasks)["treelora_nearest_drift"]
    assert n == {"same_domain_share": 0.5, "uniform_pick": (1 / 2 + 1 / 3) / 2, "previous_share": 0.5}
    merge = lambda kept, pc: {"old_predictions_kept": kept, "consistency": pc}
    tasks = [{"objectives_before": merge(0.5, 0.2), "objectives_after": merge(0.75, 0.1)},
             {"objectives_before": merge(1.0, 0.5), "objectives_after": merge(1.0, 0.25)}, {}]
    assert report.structure_measures(domains, None, tasks)["trm_merges"] == {
        "merges": 2, "kept_plain": 0.75, "kept_merged": 0.875, "consistency_plain": 0.35, "consistency_merged": 0.175}


def test_plot_or_a_hint(tmp_path):
    r = run(tmp_path, "--tasks", "2", "--epochs", "1", "--train-per-class", "2")
    log = (tmp_path / "log.txt").read_text()
    import importlib.util
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "no accuracy.png: matplotlib is not installed (pip install matplotlib)" in log
    assert r["finished"]


def test_redraw_names_a_folder_without_results(tmp_path):
    proc = subprocess.run([sys.executable, "continual.py", str(tmp_path)], cwd=HERE, capture_output=True, text=True)
    assert proc.returncode == 2 and "holds no results.json; give a run folder" in proc.stderr.splitlines()[-1]


def test_a_baseline_draws_no_mechanism(tmp_path):
    run(tmp_path, "--tasks", "2", "--epochs", "1", "--train-per-class", "2")
    assert not (tmp_path / "mechanism.png").exists()


def test_drift_recovery_by_hand():
    a_last = {"align": 60.0, "align/oracle": 80.0, "align/sdc": 65.0, "align/linear": 55.0,
              "ridge": 70.0, "ridge/oracle": 70.2, "ridge/sdc": 71.0, "ridge0/linear": 50.0, "align/oracle-mean": 75.0}
    shares = report.drift_recovery(a_last)
    assert shares == {"align/sdc": 0.25, "align/linear": -0.25, "ridge/sdc": None,  # ridge0: no stale, no oracle
                      "align/oracle-mean": 0.75}
    lines = report.describe_drift_recovery(a_last, shares)
    assert lines[0] == ("drift: align/sdc wins back 25% of the 20.00 points stale statistics cost "
                        "(align 60.00 -> 65.00; oracle 80.00)")
    assert "nothing measurable" in lines[2]
    assert lines[3] == ("drift: align/oracle-mean (the oracle's means, stale covariances) wins back 75% of the 20.00 "
                        "points stale statistics cost (align 60.00 -> 75.00; oracle 80.00)")


def test_a_run_reports_what_its_remedies_win_back(tmp_path):
    r = run(tmp_path, "--tasks", "4", "--epochs", "1", "--train-per-class", "4", "--classifier", "align",
            "--compare-heads", "align/sdc,align/oracle", "--lr", "5e-3")
    a_last = {"align": r["metrics"]["A_last"], **{k: h["metrics"]["A_last"] for k, h in r["heads"].items()}}
    assert r["drift_recovery"] == report.drift_recovery(a_last) and "align/sdc" in r["drift_recovery"]
    assert "drift: align/sdc " in (tmp_path / "log.txt").read_text()  # a share, or "nothing measurable"
