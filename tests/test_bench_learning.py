"""bench/learning.py's report: the table and PNGs redrawn from a CSV, on either x-axis.

Hand-made records with known answers (no training): "ref" rises by 0.1 per epoch to 1.0 at its
10th epoch; "fast" (herd-like: two reward queries per trajectory) reaches 1.0 at its 5th.
"""
import csv
import importlib.util
import pathlib
import sys

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
PER_EPOCH = 16  # trajectories per epoch


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_learning", REPO / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def records():
    rows = []
    for variant, per_epoch_gain, queries_per_trajectory in (("ref", 0.1, 1), ("fast", 0.2, 2)):
        for epoch in range(10):
            reward = min(1.0, per_epoch_gain * (epoch + 1))
            rows.append({
                "task": "toy", "variant": variant, "algorithm": "ddpo", "seed": 0, "epoch": epoch,
                "trajectories": (epoch + 1) * PER_EPOCH, "queries": (epoch + 1) * PER_EPOCH * queries_per_trajectory,
                "reward": reward, "reward_balanced": reward, "reward_worst_prompt": reward, "seconds": 1.0, "stopped": False,
            })
    return rows


def table_row(markdown: str, variant: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {variant} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_from_csv_counts_trajectories_or_queries(tmp_path):
    bench = load_bench()
    path = tmp_path / "learning.csv"
    rows = records()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    out = tmp_path / "traj"
    common = ["--from_csv", str(path), "--reference", "ref", "--smooth", "1"]
    assert bench.main([*common, "--budget", str(10 * PER_EPOCH), "--budget_unit", "trajectories", "--out", str(out)]) == 0
    md = (out / "learning.md").read_text()
    assert "budget 160 sampled trajectories" in md
    # fast reaches ref's final (1.0) after 5 epochs = 80 trajectories; ref only at its last epoch.
    assert table_row(md, "fast")[4] == "80 (50% of budget)"
    assert table_row(md, "ref")[4] == "160 (100% of budget)"
    assert table_row(md, "fast")[2].startswith("1.0000")
    for name in ("learning_toy.png", "learning_toy_queries.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100

    out = tmp_path / "queries"
    assert bench.main([*common, "--budget", str(10 * PER_EPOCH), "--budget_unit", "queries", "--out", str(out)]) == 0
    md = (out / "learning.md").read_text()
    # In queries fast pays double: 1.0 at 160 queries, when ref (one query per trajectory) ends.
    assert "budget 160 reward queries" in md
    assert table_row(md, "fast")[4] == "160 (100% of budget)"
    assert (out / "learning_toy_trajectories.png").exists()


def test_paired_difference_by_seed():
    """The paired column: per seed, the variant's final minus the reference's, mean ± standard error."""
    bench = load_bench()
    rows = []
    for seed, ref_final, gap in ((0, 0.1, 0.1), (1, 0.2, 0.2), (2, 0.3, 0.3)):
        for variant, final in (("ref", ref_final), ("other", ref_final + gap)):
            rows.append({"task": "toy", "variant": variant, "algorithm": "ddpo", "seed": seed, "epoch": 0,
                         "trajectories": PER_EPOCH, "queries": PER_EPOCH, "reward": final, "reward_balanced": final,
                         "reward_worst_prompt": final, "seconds": 1.0, "stopped": False})
    summary = {row["variant"]: row for row in bench.summary(rows, PER_EPOCH, 1, reference="ref", unit="trajectories")}
    # gaps 0.1, 0.2, 0.3: mean 0.2, sample std 0.1, standard error 0.1 / sqrt(3)
    assert abs(summary["other"]["paired"] - 0.2) < 1e-9
    assert abs(summary["other"]["paired_se"] - 0.1 / 3**0.5) < 1e-9
    assert summary["ref"]["paired"] == 0.0
    md = bench.table_markdown("toy", list(summary.values()), PER_EPOCH, [0, 1, 2], 1, reference="ref", unit="trajectories")
    assert table_row(md, "other")[7] == "+0.2000 ± 0.0577"
    assert table_row(md, "ref")[7] == "—"


def test_a_variants_override_beats_a_global_set(tmp_path):
    """`--set train.learning_rate=X` for every run, `--variant v=ddpo:train.learning_rate=Y`: v trains at Y."""
    bench = load_bench()
    variant = bench.parse_variant("fast=ddpo:train.learning_rate=1e-2")
    cfg = bench.make_config(bench.TASKS["color2"], variant, tmp_path / "prompts.txt", tmp_path / "run",
                            ["train.learning_rate=3e-3", "train.num_inner_epochs=2"])
    assert cfg.train.learning_rate == 1e-2
    assert cfg.train.num_inner_epochs == 2
