"""The sweep report on a sweep part-way (the evidence page's case): pending runs are listed, paired
statistics use the seeds both variants have, GCR's gradient coherence is summarised per variant, the
accuracy and coherence plots are written, all from result.json files alone, into another folder when
asked; and the docs index includes only reports that exist. Fake result.json files: no training."""

from __future__ import annotations

import csv
import json
import math
import pickle
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from scipy import stats

from frozenlm.cli import run
from frozenlm.sweep import write_report_index

SEEDS = (0, 1, 2)
VARIANTS = ("no_block", "gcr")
MISSING = ("no_block", 1)  # one seed of the baseline not finished yet


def test_acc(variant: str, seed: int) -> float:
    return 0.80 + (0.03 if variant == "gcr" else 0.0) + 0.011 * seed + (0.004 * seed * seed if variant == "gcr" else 0.0)


test_acc.__test__ = False  # a helper, not a test


def coherence(variant: str, seed: int) -> dict[str, dict[str, float]]:
    """Step 0 (initialisation) far off on purpose: the summary must leave it out."""
    shift = 0.2 if variant == "gcr" else 0.0
    return {str(step): {"grad_coherence/m_coherence": (9.0 if step == 0 else 1.0 + shift + 0.01 * step + 0.05 * seed),
                        "grad_coherence/mean_cosine": (0.9 if step == 0 else 0.01 * (1 + seed) + shift / 10),
                        "grad_coherence/m_coherence_normalized": 0.1}
            for step in (0, 30, 60)}  # fmt: skip


def fake_partial_sweep(output: Path) -> None:
    preset = {"config": "c.yaml", "seeds": list(SEEDS), "metric": "val_acc1", "mode": "max", "baseline": "no_block",
              "test": True, "coherence_every": 30, "variants": {v: [] for v in VARIANTS}}  # fmt: skip
    output.mkdir(parents=True)
    (output / "sweep.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
    for variant in VARIANTS:
        for seed in SEEDS:
            folder = output / variant / f"seed{seed}"
            folder.mkdir(parents=True)
            if (variant, seed) == MISSING:
                continue  # started nowhere yet: no result.json
            final = test_acc(variant, seed) - 0.01
            result = {"variant": variant, "seed": seed, "metric": "val_acc1", "final": final, "best": final,
                      "history": [final], "trainable_params": 10, "frozen_params": 5, "flops_per_sample": 7,
                      "seconds_per_step": 0.01, "run_seconds": 60.0 + seed, "coherence": coherence(variant, seed),
                      "test": {"test_loss": 0.3, "test_acc1": test_acc(variant, seed)}}  # fmt: skip
            (folder / "result.json").write_text(json.dumps(result))


def paired(values: dict[int, float], base: dict[int, float]) -> tuple[float, float, float]:
    """Mean paired difference and its 95 % t interval over the seeds both have, computed here."""
    d = [values[s] - base[s] for s in values if s in base]
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return statistics.mean(d), statistics.mean(d) - half, statistics.mean(d) + half


@pytest.fixture
def reported(tmp_path, monkeypatch):
    sweep_folder, docs = tmp_path / "runs" / "mnist_lowdata", tmp_path / "docs"
    fake_partial_sweep(sweep_folder)
    before = sorted(p.relative_to(sweep_folder) for p in sweep_folder.rglob("*"))

    def refuse(*args, **kwargs):
        raise AssertionError("the report unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    run(["sweep", "--report", str(sweep_folder), "--report_to", str(docs / "evidence" / "mnist_lowdata")])
    assert sorted(p.relative_to(sweep_folder) for p in sweep_folder.rglob("*")) == before  # the sweep is only read
    return docs / "evidence" / "mnist_lowdata", docs


def test_a_partial_sweep_lists_pending_runs_and_pairs_on_the_seeds_both_have(reported):
    folder, _ = reported
    markdown = (folder / "results.md").read_text()
    assert "Finished runs: 5 of 6 (2 variants x 3 seeds)." in markdown
    assert "no_block/seed1 (missing: pending, no result.json yet)" in markdown
    minutes = sum(60.0 + s for v in VARIANTS for s in SEEDS if (v, s) != MISSING) / 60
    assert (f"Wall time of the 5 finished runs' set-up, training and validation (run_seconds, summed; "
            f"the test scoring not included): {minutes:.1f} min.") in markdown
    rows = {row["variant"]: row for row in csv.DictReader((folder / "results.csv").open())}
    assert rows["no_block"]["test_seeds"] == "2" and rows["gcr"]["test_seeds"] == "3"
    acc = {v: {s: test_acc(v, s) for s in SEEDS if (v, s) != MISSING} for v in VARIANTS}
    mean, low, high = paired(acc["gcr"], acc["no_block"])  # seeds 0 and 2 only
    assert rows["gcr"]["test_pairs"] == "2"
    for key, expected in (("test_diff_mean", mean), ("test_diff_low", low), ("test_diff_high", high)):
        assert float(rows["gcr"][key]) == pytest.approx(expected, rel=1e-5)
    p = stats.ttest_1samp([acc["gcr"][s] - acc["no_block"][s] for s in (0, 2)], 0.0).pvalue
    assert float(rows["gcr"]["test_p_value"]) == pytest.approx(p, rel=1e-5)
    assert f"| gcr | 3 | {statistics.mean(acc['gcr'].values()):.4f} ± {statistics.stdev(acc['gcr'].values()):.4f} | " \
           f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] (2 pairs) |" in markdown  # fmt: skip


def test_gradient_coherence_is_summarised_per_variant_over_training(reported):
    folder, _ = reported
    rows = {row["variant"]: row for row in csv.DictReader((folder / "results.csv").open())}
    for name in ("m_coherence", "mean_cosine"):
        per_run = {v: {s: statistics.mean(coherence(v, s)[str(step)][f"grad_coherence/{name}"] for step in (30, 60))
                       for s in SEEDS if (v, s) != MISSING} for v in VARIANTS}  # fmt: skip  (step 0 left out)
        for variant in VARIANTS:
            assert float(rows[variant][f"{name}_mean"]) == pytest.approx(statistics.mean(per_run[variant].values()), rel=1e-5)
            assert float(rows[variant][f"{name}_sd"]) == pytest.approx(statistics.stdev(per_run[variant].values()), rel=1e-5)
        mean, low, high = paired(per_run["gcr"], per_run["no_block"])
        assert float(rows["gcr"][f"{name}_diff_mean"]) == pytest.approx(mean, rel=1e-5)
        assert float(rows["gcr"][f"{name}_diff_low"]) == pytest.approx(low, rel=1e-5)
        assert float(rows["gcr"][f"{name}_diff_high"]) == pytest.approx(high, rel=1e-5)
    markdown = (folder / "results.md").read_text()
    assert "Gradient coherence over training (GCR's mechanism)" in markdown
    m_gcr = statistics.mean(1.2 + 0.01 * step + 0.05 * s for step in (30, 60) for s in SEEDS)  # not step 0's 9
    assert f"| gcr | {m_gcr:.4g} ± " in markdown


def test_the_report_draws_the_accuracy_and_coherence_plots(reported):
    import matplotlib.image

    folder, _ = reported
    for name in ("results.png", "accuracy.png", "coherence.png"):
        image = matplotlib.image.imread(folder / name)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # a drawn figure, not blank


def test_the_docs_index_includes_only_reports_that_exist(reported):
    folder, docs = reported
    index = write_report_index(docs, "evidence", ["mnist_lowdata", "mnist_larger"]).read_text()
    assert index.count("--8<--") == 1 and '--8<-- "evidence/mnist_lowdata/results.md"' in index
    for plot in ("accuracy.png", "coherence.png", "results.csv"):
        assert f"(evidence/mnist_lowdata/{plot})" in index
    assert "No finished run yet, so no report: `mnist_larger`." in index
    for link in [line.split("](")[1].rstrip(").") for line in index.splitlines() if "](" in line]:
        assert (docs / link).is_file(), link


def test_report_to_without_a_report_is_a_one_line_error(monkeypatch, capsys):
    from frozenlm.cli import main

    monkeypatch.setattr("sys.argv", ["frozenlm", "sweep", "--report_to", "somewhere"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == ("frozenlm: error: ConfigurationError: --report_to goes with --report "
                                               "<sweep folder>: it says where that report's files go; add --report, "
                                               "or drop --report_to.")  # fmt: skip
