"""`frozenlm sweep`: a grid of variants x seeds that resumes after a kill and reports means, paired
differences with confidence intervals, sizes and gradient coherence."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import frozenlm.sweep
from frozenlm.cli import main, run
from frozenlm.sweep import (
    RunLockedError,
    SlurmOptions,
    SweepJob,
    SweepNotReadyError,
    SweepRunsFailedError,
    flops_per_sample,
    hold_run,
    run_arguments,
    run_recorded,
    summarize,
    sweep,
)
from tests.cli_helpers import run_cli, start_cli_subprocess

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
    assert calls == [("baseline", 1), ("random", 1)]  # seed by seed; the finished runs (seed 0) are not redone

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


def fake_sweep(output: Path, finals: dict[tuple[str, int], float | None]) -> None:
    """A sweep folder as `frozenlm sweep` leaves it: sweep.yaml and one result.json per (variant, seed)."""
    preset = {"config": "c.yaml", "seeds": [0, 1, 2], "metric": "val_acc1", "mode": "max", "baseline": "baseline",
              "variants": {"baseline": [], "block": [], "other": []}}  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    (output / "sweep.yaml").write_text(yaml.safe_dump(preset))
    for (variant, seed), final in finals.items():
        folder = output / variant / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        result = {"variant": variant, "seed": seed, "metric": "val_acc1", "final": final, "best": final,
                  "history": [] if final is None else [final], "trainable_params": 10, "frozen_params": 0,
                  "flops_per_sample": 5, "seconds_per_step": 0.01, "coherence": {}}  # fmt: skip
        (folder / "result.json").write_text(json.dumps(result))


ALL_RUNS = {(v, s): 0.5 + 0.1 * i + 0.01 * s for i, v in enumerate(("baseline", "block", "other")) for s in (0, 1, 2)}


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_text(p.read_text()[:40]), "damaged: JSONDecodeError"),
        (lambda p: p.write_text(""), "damaged: JSONDecodeError"),
        (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "final"})),
         "damaged: no final"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["truncated", "empty", "key-missing", "deleted"],
)
def test_a_damaged_or_missing_result_is_named_in_the_report_and_redone(tmp_path, monkeypatch, capsys, damage, reason):
    output = tmp_path / "sweep"
    fake_sweep(output, ALL_RUNS)
    damage(output / "block" / "seed1" / "result.json")
    sweep(report=str(output))
    markdown = (output / "results.md").read_text()
    assert f"Runs not in the table (1): block/seed1 ({reason}" in markdown
    assert "| block | 2 |" in markdown and "| other | 3 |" in markdown  # averaged over the usable runs only

    redone = []
    monkeypatch.setattr(frozenlm.sweep, "run_one", lambda preset, variant, seed, folder, *rest: redone.append((variant, seed)))
    monkeypatch.setattr(frozenlm.sweep, "load_preset", lambda path: yaml.safe_load((output / "sweep.yaml").read_text()))
    sweep("preset.yaml", output=str(output))
    assert redone == [("block", 1)]
    if reason != "missing":
        assert f"Redoing block/seed1: its result.json is {reason}" in capsys.readouterr().out


def test_a_run_that_never_validated_is_listed_not_averaged(tmp_path):
    output = tmp_path / "sweep"
    fake_sweep(output, {**ALL_RUNS, ("other", 0): None, ("other", 1): None, ("other", 2): None})
    sweep(report=str(output))
    markdown = (output / "results.md").read_text()
    assert "other/seed0 (no val_acc1: it never validated)" in markdown and "| other |" not in markdown
    for variant, seed in ALL_RUNS:
        (output / variant / f"seed{seed}" / "result.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"No finished run with a val_acc1 .*baseline/seed0 \(missing\)"):
        sweep(report=str(output))


def test_the_csv_keeps_variant_names_with_commas_and_quotes(tmp_path):
    output = tmp_path / "sweep"
    names = {"baseline": "baseline", "block": 'lr=1e-3,wd=0.05', "other": 'block "last", frozen'}
    fake_sweep(output, ALL_RUNS)
    preset = yaml.safe_load((output / "sweep.yaml").read_text())
    preset["variants"] = {names[v]: [] for v in preset["variants"]}
    (output / "sweep.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
    for variant, seed in ALL_RUNS:
        folder = output / variant / f"seed{seed}"
        result = json.loads((folder / "result.json").read_text())
        renamed = frozenlm.sweep.run_folder(output, names[variant], seed)
        renamed.mkdir(parents=True, exist_ok=True)
        (renamed / "result.json").write_text(json.dumps({**result, "variant": names[variant]}))
    sweep(report=str(output))
    with (output / "results.csv").open(newline="") as file:
        rows = list(csv.reader(file))
    assert [row[0] for row in rows] == ["variant", *names.values()]
    assert {len(row) for row in rows} == {len(rows[0])}  # every row as wide as the header
    table = {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    assert table['block "last", frozen']["baseline"] == "baseline" and float(table["lr=1e-3,wd=0.05"]["seeds"]) == 3


def test_results_are_written_atomically(tmp_path, monkeypatch):
    from frozenlm.files import write_atomically

    path = tmp_path / "result.json"
    write_atomically(path, '{"final": 1}')

    def disk_full(self, data):
        Path.write_text(self, "{")  # half written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, '{"final": 2}')
    assert json.loads(path.read_text()) == {"final": 1} and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_holm_correction_against_hand_computed_values():
    def result(variant, seed, final):
        return {"variant": variant, "seed": seed, "final": final, "best": final, "trainable_params": 1,
                "frozen_params": 0, "flops_per_sample": 1, "seconds_per_step": 0.01, "coherence": {}}  # fmt: skip

    base = [0.50, 0.60, 0.70]
    runs = [result("baseline", s, f) for s, f in enumerate(base)]
    runs += [result("a", s, f + d) for s, (f, d) in enumerate(zip(base, (0.10, 0.12, 0.14)))]  # diffs 0.10, 0.12, 0.14
    runs += [result("b", s, f + d) for s, (f, d) in enumerate(zip(base, (0.01, -0.02, 0.04)))]
    rows = {r["variant"]: r for r in summarize(runs, "baseline")}
    # a: mean 0.12, sd 0.02, t = 0.12 / (0.02 / sqrt 3) = 10.3923, 2 dof -> p = 0.0091325
    # b: mean 0.01, sd 0.03, t = 0.57735 -> p = 0.62200. Holm over 2: a 2 x 0.0091325, b max(that, 0.622).
    assert rows["a"]["p_value"] == pytest.approx(0.0091325, rel=1e-4)
    assert rows["b"]["p_value"] == pytest.approx(0.62200, rel=1e-4)
    assert rows["a"]["p_holm"] == pytest.approx(2 * 0.0091325, rel=1e-4)
    assert rows["b"]["p_holm"] == pytest.approx(0.62200, rel=1e-4)
    assert rows["a"]["diff_low"] == pytest.approx(0.12 - 4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert math.isnan(rows["baseline"]["p_value"]) and math.isnan(rows["baseline"]["p_holm"])


def test_flops_count_attention_on_cpu_tensors_as_on_the_meta_device():
    """On the meta device attention decomposes into counted matmuls; on the CPU it is one fused kernel
    that PyTorch's table leaves out. frozenlm's counter gives both the same total."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from frozenlm.measure import flop_counter
    from frozenlm.models import create_vit

    counts = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = create_vit("vit_tiny_patch16_224", 10, img_size=32, depth=2).eval()
            images = torch.zeros(1, 3, 32, 32)
            with flop_counter() as counter, torch.no_grad():
                model(images)
            with FlopCounterMode(display=False) as plain, torch.no_grad():
                model(images)
        counts[device] = (counter.get_total_flops(), plain.get_total_flops())
    # 2 blocks x (Q K^T + P V) = 2 x 2 x (2 x 1 x 3 heads x 5 x 5 tokens x 64)
    attention = 2 * 2 * 2 * 3 * 5 * 5 * 64
    assert counts["cpu"][0] == counts["meta"][0] == counts["cpu"][1] + attention


def test_local_launcher_runs_jobs_resumes_a_preempted_one_and_reports_a_failed_one(tmp_path, tiny_llama_checkpoint):
    """`--launcher local`: each run a submitit job in its own process. A job preempted after 2 of 3
    epochs (the cluster's SIGUSR2) is requeued and resumes from its last.ckpt, ending with the history
    and metrics of an uninterrupted run; a job that fails is reported with its log."""
    args = ["--trainer.max_epochs", "3"]
    plain = ["--model.llm", "null"]
    preempt = [*plain, "--trainer.callbacks+=tests.cli_helpers.PreemptOnce", "--trainer.callbacks.path", str(tmp_path / "preempted")]
    preset = {"config": str(CONF / "image_llama.yaml"), "args": args, "seeds": [0], "baseline": "plain",
              "variants": {"plain": preempt, "broken": ["--model.backbone", "no_such_vit"]}}  # fmt: skip
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(preset))
    output = tmp_path / "local"
    with pytest.raises(SweepRunsFailedError, match=r"1 of 2 runs of .* failed: broken/seed0 \(failed \(local job \d+: "):
        sweep(str(tmp_path / "local.yaml"), output=str(output), launcher="local", parallel=2)

    assert (tmp_path / "preempted").exists()  # the signal was sent
    job = json.loads((output / "plain" / "seed0" / "job.json").read_text())
    assert "Resuming plain/seed0 from" in Path(job["stdout"]).read_text()
    result = json.loads((output / "plain" / "seed0" / "result.json").read_text())
    straight = {**preset, "variants": {"plain": plain}}
    (tmp_path / "inline.yaml").write_text(yaml.safe_dump(straight))
    sweep(str(tmp_path / "inline.yaml"), output=str(tmp_path / "inline"))
    expected = json.loads((tmp_path / "inline" / "plain" / "seed0" / "result.json").read_text())
    assert len(result["history"]) == 3 and result["history"] == expected["history"]

    report = (output / "results.md").read_text()
    failed = json.loads((output / "broken" / "seed0" / "job.json").read_text())
    assert f"broken/seed0 (failed (local job {failed['job_id']}: ConfigurationError: " in report and failed["stderr"] in report
    assert "no_such_vit" in Path(failed["stderr"]).read_text()
    outcome = json.loads((output / "broken" / "seed0" / "outcome.json").read_text())  # the job's own record
    assert outcome["status"] == "failed" and outcome["log"] == failed["stderr"] and "no_such_vit" in outcome["error"]
    assert json.loads((output / "plain" / "seed0" / "outcome.json").read_text())["status"] == "done"
    assert not (output / "plain" / "seed0" / "run.lock").exists()  # released when the run ended


def test_slurm_launcher_submits_a_job_array_and_reports_job_states(tmp_path, tiny_llama_checkpoint, monkeypatch):
    """`--launcher slurm` against stand-ins for `sbatch` and `sacct` on PATH (no cluster here): one job
    array with the requested resources and the preemption signal, a job.json per run, and the report's
    pending / running / failed from SLURM's job states."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    states = "JobID|State|NodeList\\n4242_0|PENDING|\\n4242_1|RUNNING|node7\\n4242_2|TIMEOUT|node7\\n"
    (bin_dir / "sacct").write_text(f'#!/bin/sh\nprintf "{states}"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # only looked for
    for tool in ("sbatch", "sacct", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    preset = tiny_preset(tmp_path, tiny_llama_checkpoint)
    output = tmp_path / "slurm"
    run(["sweep", "--preset", str(preset), "--output", str(output), "--launcher", "slurm", "--slurm.partition", "gpu",
         "--slurm.gpus_per_node", "4", "--slurm.nodes", "2", "--slurm.timeout_min", "120"])  # fmt: skip

    script = (tmp_path / "submitted.sh").read_text()
    for line in ("--array=0-3%4", "--partition=gpu", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                 "--signal=USR2@90", "--time=120"):  # fmt: skip
        assert f"#SBATCH {line}" in script, line
    jobs = {f"{v}/seed{s}": json.loads((output / v / f"seed{s}" / "job.json").read_text())["job_id"]
            for v in ("baseline", "random") for s in (0, 1)}  # fmt: skip
    assert sorted(jobs.values()) == ["4242_0", "4242_1", "4242_2", "4242_3"]
    job = SweepJob(yaml.safe_load((output / "sweep.yaml").read_text()), output, "random", 0, SlurmOptions(nodes=2, gpus_per_node=4).trainer_args())
    assert job.trainer_args == ["--trainer.devices", "4", "--trainer.num_nodes", "2"]

    with pytest.raises(SweepNotReadyError) as error:
        run(["sweep", "--report", str(output)])
    message = str(error.value)
    assert "baseline/seed0 (pending (slurm job 4242_0, PENDING))" in message
    assert "random/seed0 (running (slurm job 4242_1, RUNNING; log: " in message
    assert "baseline/seed1 (failed (slurm job 4242_2, TIMEOUT; log: " in message


def test_placeholders_and_a_baseline_per_variant(tmp_path):
    preset = {"config": "c.yaml", "args": ["--model.llm", "null"], "seeds": [3], "metric": "val_acc1", "coherence_every": 0,
              "variants": {"from": ["--model.init_from", "{output}/first/seed{seed}/last.ckpt"]}}  # fmt: skip
    args = run_arguments(preset, "from", 3, tmp_path)
    assert f"{tmp_path}/first/seed3/last.ckpt" in args
    assert "--model.llm.seed" not in args  # the preset's `--model.llm null` holds for every variant
    runs = [{"variant": v, "seed": s, "final": f, "best": f, "trainable_params": 1, "frozen_params": 0,
             "flops_per_sample": None, "seconds_per_step": 0.1, "coherence": {}}
            for v, s, f in [("a", 0, 0.5), ("a", 1, 0.6), ("b", 0, 0.7), ("b", 1, 0.9), ("c", 0, 0.1), ("c", 1, 0.2)]]  # fmt: skip
    rows = {r["variant"]: r for r in summarize(runs, {"b": "a", "c": "b"})}
    assert rows["b"]["baseline"] == "a" and rows["b"]["diff_mean"] == pytest.approx(0.25)
    assert rows["c"]["baseline"] == "b" and rows["c"]["diff_mean"] == pytest.approx(-0.65)
    assert rows["a"]["baseline"] is None and math.isnan(rows["a"]["p_value"])


def test_no_block_seed_is_added_when_the_config_has_no_block(tmp_path):
    preset = {"config": "configs/cifar100_deit_baseline.yaml", "args": [], "seeds": [0], "metric": "val_acc1",
              "coherence_every": 0, "variants": {"plain": [], "with_block": ["--model.llm.checkpoint", "x"]}}  # fmt: skip
    assert "--model.llm.seed" not in run_arguments(preset, "plain", 0, tmp_path)
    assert "--model.llm.seed" in run_arguments(preset, "with_block", 0, tmp_path)


# -- the report reads JSON only; runs record how they ended ----------------------------------------
class WritesAMarker:
    """Unpickling this creates the file ``path``: what a crafted pickle planted in a sweep folder could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def fake_run_one(preset, variant, seed, output, extra_args=(), write=True):
    """Stands in for a training run: writes the run's result.json, or fails for the variant `broken`."""
    if variant == "broken":
        raise ValueError("the data cannot be read\nRuntimeError: the last line of the error")
    final = 0.5 + 0.01 * seed
    result = {"variant": variant, "seed": seed, "metric": "val_acc1", "final": final, "best": final, "history": [final],
              "trainable_params": 10, "frozen_params": 0, "flops_per_sample": 5, "seconds_per_step": 0.01, "coherence": {}}  # fmt: skip
    (output / variant / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    (output / variant / f"seed{seed}" / "result.json").write_text(json.dumps(result))
    return result


def sweep_folder(output: Path, variants: dict[str, list], seeds=(0,)) -> Path:
    """A preset over ``variants`` and its sweep folder's sweep.yaml; returns the preset's path."""
    preset = {"config": "c.yaml", "args": [], "seeds": list(seeds), "metric": "val_acc1", "mode": "max",
              "baseline": next(iter(variants)), "coherence_every": 0, "variants": variants}  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    (output / "sweep.yaml").write_text(yaml.safe_dump(preset))
    path = output.parent / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def test_the_report_never_unpickles_and_still_says_where_each_run_stands(tmp_path, monkeypatch):
    output, marker = tmp_path / "sweep", tmp_path / "unpickled"
    sweep_folder(output, {"done": [], "broken": [], "queued": [], "busy": []})
    monkeypatch.setattr(frozenlm.sweep, "run_one", fake_run_one)
    run_recorded(yaml.safe_load((output / "sweep.yaml").read_text()), "done", 0, output)
    with pytest.raises(ValueError):
        run_recorded(yaml.safe_load((output / "sweep.yaml").read_text()), "broken", 0, output)
    # broken/seed0 ran as local job 4001 (long ended), queued/seed0 is SLURM job 4242_0 (pending); every job
    # has a crafted result pickle where submitit keeps its own.
    jobs = output / "jobs"
    jobs.mkdir()
    for variant, launcher, job_id in (("broken", "local", "4001"), ("queued", "slurm", "4242_0")):
        record = {"launcher": launcher, "job_id": job_id, "folder": str(jobs), "stdout": str(jobs / f"{job_id}_0_log.out"),
                  "stderr": str(jobs / f"{job_id}_0_log.err"), "submitted": 0.0, "host": "elsewhere"}  # fmt: skip
        (output / variant / "seed0").mkdir(parents=True, exist_ok=True)
        (output / variant / "seed0" / "job.json").write_text(json.dumps(record))
        for name in (f"{job_id}_result.pkl", f"{job_id}_0_result.pkl"):
            (jobs / name).write_bytes(pickle.dumps(("error", WritesAMarker(marker))))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text('#!/bin/sh\nprintf "JobID|State|NodeList\\n4242_0|PENDING|\\n"\n')
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    busy = output / "busy" / "seed0"
    with hold_run(busy):  # this process trains busy/seed0
        run(["sweep", "--report", str(output)])
        umask = os.umask(0o022)
        os.umask(umask)
        assert (busy / "run.lock").stat().st_mode & 0o777 == 0o666 & ~umask  # colleagues can read who holds it
    assert not marker.exists()
    report = (output / "results.md").read_text()
    assert "| done | 1 |" in report
    assert (f"broken/seed0 (failed (ValueError: RuntimeError: the last line of the error; log: "
            f"{output / 'broken' / 'seed0' / 'error.log'}))") in report  # fmt: skip
    assert "Traceback" in (output / "broken" / "seed0" / "error.log").read_text()
    assert "queued/seed0 (pending (slurm job 4242_0, PENDING))" in report
    assert f"busy/seed0 (running (process {os.getpid()} on {socket.gethostname()} since " in report


def test_failed_runs_make_the_sweep_exit_2_naming_them_after_the_others_ran(tmp_path, monkeypatch, capsys):
    preset = sweep_folder(tmp_path / "sweep", {"plain": [], "broken": []}, seeds=(0, 1))
    monkeypatch.setattr(frozenlm.sweep, "run_one", fake_run_one)
    monkeypatch.setattr("sys.argv", ["frozenlm", "sweep", "--preset", str(preset), "--output", str(tmp_path / "sweep")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    log = tmp_path / "sweep" / "broken" / "seed{}" / "error.log"
    errors = [line for line in err if line.startswith("frozenlm: error:")]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert errors[0] == (
        f"frozenlm: error: SweepRunsFailedError: 2 of 4 runs of {tmp_path / 'sweep'} failed: broken/seed0 (failed "
        f"(ValueError: RuntimeError: the last line of the error; log: {str(log).format(0)})); broken/seed1 (failed "
        f"(ValueError: RuntimeError: the last line of the error; log: {str(log).format(1)})). The report covers the "
        "others; fix the cause and run the same `frozenlm sweep` again to redo them."
    )
    assert "| plain | 2 |" in (tmp_path / "sweep" / "results.md").read_text()  # both plain runs ran and are reported


# -- a run folder is held while its run trains: never started twice ------------------------------------
def write_lock(folder: Path, pid: int, host: str, started: float, limit_s: float | None) -> None:
    """A run.lock as another process writes it (see `hold_run`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.lock").write_text(json.dumps({"pid": pid, "host": host, "started": started, "limit_s": limit_s}))


def test_a_run_held_by_a_live_process_is_never_started_twice_and_reported_running(tmp_path, monkeypatch, capsys):
    output = tmp_path / "sweep"
    preset = sweep_folder(output, {"a": [], "b": []})
    started = []
    monkeypatch.setattr(frozenlm.sweep, "run_one", lambda *args: started.append(args[1]) or fake_run_one(*args))
    holder = subprocess.Popen(["sleep", "60"])  # a live process of this host, as an orphaned job would be
    try:
        write_lock(output / "b" / "seed0", holder.pid, socket.gethostname(), time.time(), 3600)
        sweep(str(preset), output=str(output))
        assert started == ["a"]
        out = capsys.readouterr().out
        assert f"Not starting b/seed0: running (process {holder.pid} on {socket.gethostname()} since " in out
        assert f"b/seed0 (running (process {holder.pid} on " in (output / "results.md").read_text()
        with pytest.raises(RunLockedError, match=rf"b/seed0 is held by process {holder.pid} on "):
            run_recorded(yaml.safe_load(preset.read_text()), "b", 0, output)  # what a job started anyway meets
        assert started == ["a"] and not (output / "b" / "seed0" / "outcome.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its process has ended: the lock is stale, taken over in one line, and the run starts.
    sweep(str(preset), output=str(output))
    assert started == ["a", "b"]
    assert f"Taking over the stale lock of {output / 'b' / 'seed0'}: process {holder.pid} on " in capsys.readouterr().out
    assert not (output / "b" / "seed0" / "run.lock").exists()


def test_a_lock_of_another_host_holds_until_the_time_limit_or_force_unlock(tmp_path, monkeypatch, capsys):
    output = tmp_path / "sweep"
    preset = sweep_folder(output, {"a": [], "b": [], "c": []})
    started = []
    monkeypatch.setattr(frozenlm.sweep, "run_one", lambda *args: started.append(args[1]) or fake_run_one(*args))
    now = time.time()
    write_lock(output / "a" / "seed0", 4242, "node7", now - 600, 3600)  # within its time limit: held
    write_lock(output / "b" / "seed0", 4242, "node7", now - 7200, 3600)  # past it: stale
    write_lock(output / "c" / "seed0", 4242, "node7", now - 7200, None)  # no time limit (inline): held
    sweep(str(preset), output=str(output))
    assert started == ["b"]
    out = capsys.readouterr().out
    assert "Not starting a/seed0: running (process 4242 on node7 since " in out and "another host: held until " in out
    assert "Not starting c/seed0: running" in out and "held with no time limit or until --force_unlock" in out
    assert "Taking over the stale lock of" in out and "past the run's time limit" in out
    run(["sweep", "--preset", str(preset), "--output", str(output), "--force_unlock", "true"])
    assert sorted(started) == ["a", "b", "c"]
    assert "Removing the lock of a/seed0 (--force_unlock): process 4242 on node7" in capsys.readouterr().out


# -- FLOPs per sample, every family -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_llama_checkpoint) -> dict[str, tuple[str, list[str], str, str]]:
    """Per family: its tiny config, the arguments that give it tiny data and models, its metric and mode."""
    from frozenlm.tasks.uta import CLIP_TEMPLATES
    from tests.data.argoverse2.data import write as write_argoverse2
    from tests.data.clip.teacher import write as write_teacher
    from tests.data.flickr30k.data import TEMPLATES
    from tests.data.flickr30k.data import write as write_flickr30k
    from tests.data.meter.towers import write as write_towers
    from tests.data.scanobjectnn.data import write as write_scanobjectnn
    from tests.data.ssv2.data import write as write_ssv2
    from tests.data.vqav2.data import write as write_vqav2

    root, llm = tmp_path_factory.mktemp("families"), ["--model.llm.checkpoint", str(tiny_llama_checkpoint)]
    texts = [t.format(colour="red", shape="square") for t in TEMPLATES] + ["What color is the circle? How many squares?"]
    vision, text = write_towers(root / "towers", texts)
    towers = ["--model.vision_checkpoint", str(vision), "--model.text_checkpoint", str(text), *llm]
    teacher = write_teacher(root / "clip", [t.format(n) for n in ("zero", "one", "two") for t in CLIP_TEMPLATES])
    return {
        "image": ("image_llama", llm, "val_acc1", "max"),
        "learngene": ("image_baseline", ["--model.learngene", "{genes: 2, basis: chebyshev}"], "val_acc1", "max"),
        "video": ("video_llama", ["--data.root", str(write_ssv2(root / "ssv2")), *llm], "val_acc1", "max"),
        "pointcloud": ("pointcloud_llama", ["--data.root", str(write_scanobjectnn(root / "scanobjectnn")), *llm], "val_acc1", "max"),
        "motion": ("motion_llama", ["--data.root", str(write_argoverse2(root / "argoverse2")), *llm], "val_minFDE_6", "min"),
        "vqa": ("vqa_llama", ["--data.root", str(write_vqav2(root / "vqav2")), *towers], "val_vqa_acc", "max"),
        "retrieval": ("retrieval_llama", ["--data.root", str(write_flickr30k(root / "flickr30k")), *towers], "val_r_mean", "max"),
        "uta": ("uta", ["--model.teacher", str(teacher)], "val_zeroshot_acc1", "max"),
    }  # fmt: skip


FAMILIES = ["image", "learngene", "video", "pointcloud", "motion", "vqa", "retrieval", "uta"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_counts_its_flops_per_sample(family, families, tmp_path, monkeypatch):
    config, args, _, _ = families[family]
    cli = run_cli("validate", config, tmp_path, *args, "--trainer.limit_val_batches", "1")
    flops, error = flops_per_sample(cli.model, cli.datamodule)
    assert error is None and flops > 0, error
    if family == "image":  # what it counts: the forward on one validation image
        from frozenlm.measure import flop_counter

        images = next(iter(cli.datamodule.val_dataloader()))["image"][:1]
        with flop_counter() as counter, torch.no_grad():
            cli.model.eval()(images)
        assert flops == counter.get_total_flops()
        monkeypatch.setattr(type(cli.model), "sample_forward", lambda *args: 1 / 0)
        assert flops_per_sample(cli.model, cli.datamodule) == (None, "ZeroDivisionError: division by zero")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_one_seed_sweep_of_every_family_writes_its_result(family, families, tmp_path):
    config, args, metric, mode = families[family]
    few = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    preset = {"config": str(CONF / f"{config}.yaml"), "args": [*args, *few], "seeds": [0], "metric": metric,
              "mode": mode, "variants": {family: []}}  # fmt: skip
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    run(["sweep", "--preset", str(tmp_path / "preset.yaml"), "--output", str(tmp_path / "sweep")])
    result = json.loads((tmp_path / "sweep" / family / "seed0" / "result.json").read_text())
    assert result["flops_per_sample"] > 0 and result["flops_error"] is None and result["final"] is not None
    assert json.loads((tmp_path / "sweep" / family / "seed0" / "outcome.json").read_text())["status"] == "done"


class WaitForFile(L.Callback):
    """Holds training at its first step until the file ``path`` exists (a run still going)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module) -> None:
        while not self.path.exists():
            time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_to_a_local_sweep_then_a_rerun_never_starts_its_orphaned_run_twice(tmp_path, capsys):
    """The sweep process killed with SIGTERM leaves its local job training; running the sweep again does
    not start that run a second time, and reports it running until it ends."""
    release = tmp_path / "release"
    preset = {"config": str(CONF / "image_baseline.yaml"), "seeds": [0], "variants": {"plain": [
        "--trainer.max_epochs", "1", "--trainer.callbacks+=tests.test_sweep.WaitForFile", "--trainer.callbacks.path", str(release)]}}  # fmt: skip
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    output, lock = tmp_path / "sweep", tmp_path / "sweep" / "plain" / "seed0" / "run.lock"
    command = [sys.executable, "-m", "frozenlm.cli", "sweep", "--preset", str(tmp_path / "preset.yaml"), "--output",
               str(output), "--launcher", "local"]  # fmt: skip
    first = start_cli_subprocess(command)
    try:
        deadline = time.time() + 300
        while not lock.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert lock.exists(), first.communicate(timeout=5)
        os.kill(first.pid, signal.SIGTERM)  # the sweep only: its job goes on, orphaned
        first.wait(timeout=60)
        holder = json.loads(lock.read_text())["pid"]
        with pytest.raises(SweepNotReadyError, match=rf"plain/seed0 \(running \(process {holder} on "):
            sweep(str(tmp_path / "preset.yaml"), output=str(output), launcher="local")
        assert f"Not starting plain/seed0: running (process {holder} on " in capsys.readouterr().out
        assert len(list((output / "jobs").glob("*_0_log.out"))) == 1  # no second job
        release.touch()
        deadline = time.time() + 300
        while lock.exists() and time.time() < deadline:
            time.sleep(0.5)
        run(["sweep", "--report", str(output)])
        assert "| plain | 1 |" in (output / "results.md").read_text()
    finally:
        release.touch()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
