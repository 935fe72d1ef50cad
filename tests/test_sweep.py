"""`frozenlm sweep`: a grid of variants x seeds that resumes after a kill and reports means, paired
differences with confidence intervals, sizes and gradient coherence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import frozenlm.sweep
from frozenlm.cli import run
from frozenlm.sweep import run_arguments, summarize, sweep

CONF = Path(__file__).parent / "conf"


def tiny_preset(tmp_path: Path, checkpoint: Path) -> Path:
    preset = {
        "config": str(CONF / "image_llama.yaml"),
        "args": ["--model.llm.checkpoint", str(checkpoint), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3"],
        "seeds": [0, 1],
        "metric": "val_acc1",
        "mode": "max",
        "baseline": "baseline",
        "coherence_every": 2,
        "variants": {"baseline": ["--model.llm", "null"], "random": ["--model.llm.init", "random"]},
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def test_sweep_runs_resumes_after_a_kill_and_reports(tmp_path, tiny_llama_checkpoint, monkeypatch):
    preset, output = tiny_preset(tmp_path, tiny_llama_checkpoint), tmp_path / "sweep"
    calls, original = [], frozenlm.sweep.run_one

    def killed_on_the_third(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[1:3])
        return original(*args)

    monkeypatch.setattr(frozenlm.sweep, "run_one", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        sweep(str(preset), output=str(output))
    assert len(list(output.glob("*/seed*/result.json"))) == 2
    calls.clear()
    sweep(str(preset), output=str(output))
    assert calls == [("random", 0), ("random", 1)]  # the finished runs are not redone

    result = json.loads((output / "random" / "seed1" / "result.json").read_text())
    assert len(result["history"]) == 2 and result["final"] == result["history"][-1]
    assert result["frozen_params"] > 0 and result["trainable_params"] > 0 and result["flops_per_sample"] > 0
    assert {"0", "2", "4"} <= set(result["coherence"])  # measured every 2 steps
    assert 0 < result["setup_seconds"] < result["run_seconds"]
    assert (output / "random" / "seed1" / "config.yaml").is_file()  # the run's resolved config
    baseline = json.loads((output / "baseline" / "seed0" / "result.json").read_text())
    assert baseline["frozen_params"] == 0 and baseline["data_split"] == {"val_fraction": 0.2, "seed": 0}
    markdown = (output / "results.md").read_text()
    assert "| random | 2 |" in markdown and "m_coherence@2" in markdown
    assert 'Data split of every run: {"seed": 0, "val_fraction": 0.2}' in markdown
    assert (output / "results.png").stat().st_size > 0
    csv_before = (output / "results.csv").read_text()
    (output / "results.csv").unlink()
    run(["sweep", "--report", str(output)])  # rebuilt from the run folders alone
    assert (output / "results.csv").read_text() == csv_before


def test_statistics_against_hand_computed_values():
    def result(variant, seed, final, best):
        return {"variant": variant, "seed": seed, "final": final, "best": best, "trainable_params": 10,
                "frozen_params": 0, "flops_per_sample": 5, "seconds_per_step": 0.01, "coherence": {}}  # fmt: skip

    rows = {r["variant"]: r for r in summarize([
        result("baseline", 0, 0.5, 0.6), result("baseline", 1, 0.7, 0.8),
        result("block", 0, 0.6, 0.7), result("block", 1, 0.9, 0.9),
    ], "baseline")}  # fmt: skip
    block = rows["block"]
    assert block["final_mean"] == pytest.approx(0.75) and block["final_sd"] == pytest.approx(0.2121320)
    assert block["best_mean"] == pytest.approx(0.8) and block["best_sd"] == pytest.approx(0.1414214)
    # Paired differences 0.1 and 0.2: mean 0.15, sd 0.0707107, t(0.975, 1 dof) = 12.7062 -> 12.7062 x 0.05.
    assert block["diff_mean"] == pytest.approx(0.15) and block["diff_ci95"] == pytest.approx(0.635310, rel=1e-5)
    assert rows["baseline"]["diff_mean"] == 0.0 and math.isnan(summarize([result("a", 0, 1, 1)], "a")[0]["final_sd"])


def test_a_run_seed_also_seeds_a_random_block_unless_pinned(tmp_path, tiny_llama_checkpoint):
    preset = frozenlm.sweep.load_preset(tiny_preset(tmp_path, tiny_llama_checkpoint))
    args = run_arguments(preset, "random", 3, tmp_path)
    assert args[args.index("--model.llm.seed") + 1] == "3"
    assert "--model.llm.seed" not in run_arguments(preset, "baseline", 3, tmp_path)
    preset["variants"]["random"] += ["--model.llm.seed", "7"]
    assert run_arguments(preset, "random", 3, tmp_path).count("--model.llm.seed") == 1


PRESETS = sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_variant_parses(path, tmp_path, capsys):
    preset = frozenlm.sweep.load_preset(path)
    for variant in preset["variants"]:
        with pytest.raises(SystemExit) as exit_info:
            run([*run_arguments(preset, variant, 0, tmp_path), "--print_config"])
        assert exit_info.value.code == 0, (variant, capsys.readouterr().err[-2000:])
