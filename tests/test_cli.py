"""The `frozenlm` console script: help, configs, reproduce targets, errors, and full runs through it."""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from frozenlm.cli import _extra_commands, main, run
from frozenlm.trainer_cli import FrozenLMCLI, with_task_checkpoints
from frozenlm.predictions import PredictionOutputError
from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli
from tests.conftest import build_tiny_lm, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
REPRODUCE_TARGETS = [
    "reproduce-cifar100",
    "reproduce-cifar100-baseline",
    "reproduce-imagenet-vitt",
    "reproduce-imagenet-vitt-llama",
    "reproduce-imagenet-vits",
    "reproduce-imagenet-vits-llama",
    "reproduce-imagenet-vitb",
    "reproduce-imagenet-vitb-llama",
    "reproduce-caltech256",
    "reproduce-cifar100-gcr",
    "reproduce-caltech256-gcr",
    "reproduce-imagenet-vits-gcr",
    *[f"reproduce-cifar100-{v}" for v in ("convstem", "convstem-llama", "lora")],
    *[f"reproduce-imagenet-vits-{v}{s}" for v in ("convstem", "cape") for s in ("", "-llama")],
    "reproduce-imagenet-learngene", "reproduce-imagenet-learngene-ict", "reproduce-imagenet-tleg-auxs",
    "reproduce-ssv2-small",
    "reproduce-ssv2-small-llama",
    "reproduce-ssv2-small-gcr",
    "reproduce-ssv2-base",
    "reproduce-ssv2-base-llama",
    "reproduce-ssv2-base-gcr",
    "reproduce-ssv2-small-llama-last",
    "reproduce-ssv2-base-llama-last",
    *[f"reproduce-scanobjectnn-{v}{s}" for v in ("objbg", "objonly", "hardest") for s in ("", "-llama", "-gcr")],
    *[f"reproduce-modelnet40-{n}{s}" for n in ("1k", "4k", "8k") for s in ("", "-llama")],
    *[f"reproduce-argoverse1-vectornet{s}" for s in ("", "-llama", "-gcr")],
    "reproduce-argoverse2-vectornet",
    "reproduce-argoverse2-vectornet-llama",
    "reproduce-argoverse2-vectornet-fullmap",
    "reproduce-argoverse2-vectornet-fullmap-llama",
    *[f"reproduce-{d}{s}" for d in ("vqav2", "flickr30k") for s in ("", "-llama")],
    "reproduce-uta-pretrain", "reproduce-uta-zeroshot", "reproduce-uta-finetune",
    "reproduce-sqa3d", "reproduce-sqa3d-llama",
]


def test_help_lists_every_command_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    dispatched = [*FrozenLMCLI.subcommands(), *_extra_commands()]  # what `frozenlm <command>` runs
    for command in dispatched:
        assert re.search(rf"^  frozenlm {command} +\w.+$", out, re.M), f"{command} is not listed in --help:\n{out}"


@functools.cache
def printed_config(config: Path) -> str:
    """What ``frozenlm fit --config <config> --print_config`` prints (once per session: two tests read it)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config):
    assert "class_path: frozenlm.tasks." in printed_config(config)


# The (monitor, mode) of the ModelCheckpoint each shipped config used at commit 75a3724, before tasks
# declared their metric (None: no best checkpoint), as that commit's own CLI resolved them: printed by
# running, in a checkout of 75a3724, `frozenlm fit --config <config> --print_config` for each config and
# reading the monitored ModelCheckpoint out of the printed `trainer.callbacks` (default or the config's).
MONITORED_AT_75A3724 = {
    "argoverse1_vectornet": ("val_minFDE_6", "min"),
    "argoverse1_vectornet_gcr": ("val_minFDE_6", "min"),
    "argoverse1_vectornet_llama": ("val_minFDE_6", "min"),
    "argoverse2_vectornet": ("val_minFDE_6", "min"),
    "argoverse2_vectornet_fullmap": ("val_minFDE_6", "min"),
    "argoverse2_vectornet_fullmap_llama": ("val_minFDE_6", "min"),
    "argoverse2_vectornet_llama": ("val_minFDE_6", "min"),
    "caltech256_deit": ("val_acc1", "max"),
    "caltech256_deit_gcr": ("val_acc1", "max"),
    "cifar100_deit": ("val_acc1", "max"),
    "cifar100_deit_baseline": ("val_acc1", "max"),
    "cifar100_deit_convstem": ("val_acc1", "max"),
    "cifar100_deit_convstem_llama": ("val_acc1", "max"),
    "cifar100_deit_gcr": ("val_acc1", "max"),
    "cifar100_deit_lora": ("val_acc1", "max"),
    "demo": ("val_acc1", "max"),
    "demo_uta": ("val_zeroshot_acc1", "max"),
    "flickr30k_meter": ("val_r_mean", "max"),
    "flickr30k_meter_llama": ("val_r_mean", "max"),
    "imagenet21k_uta_base": None,
    "imagenet_deit_base": ("val_acc1", "max"),
    "imagenet_deit_base_llama": ("val_acc1", "max"),
    "imagenet_deit_small": ("val_acc1", "max"),
    "imagenet_deit_small_cape": ("val_acc1", "max"),
    "imagenet_deit_small_cape_llama": ("val_acc1", "max"),
    "imagenet_deit_small_convstem": ("val_acc1", "max"),
    "imagenet_deit_small_convstem_llama": ("val_acc1", "max"),
    "imagenet_deit_small_gcr": ("val_acc1", "max"),
    "imagenet_deit_small_llama": ("val_acc1", "max"),
    "imagenet_deit_tiny": ("val_acc1", "max"),
    "imagenet_deit_tiny_llama": ("val_acc1", "max"),
    "imagenet_learngene_deitb": ("val_acc1", "max"),
    "imagenet_tleg_auxs": ("val_acc1", "max"),
    "imagenet_uta_base_finetune": ("val_acc1", "max"),
    "imagenet_uta_base_zeroshot": ("val_acc1", "max"),
    "modelnet40_1k_pointbert": ("val_acc1", "max"),
    "modelnet40_1k_pointbert_llama": ("val_acc1", "max"),
    "modelnet40_4k_pointbert": ("val_acc1", "max"),
    "modelnet40_4k_pointbert_llama": ("val_acc1", "max"),
    "modelnet40_8k_pointbert": ("val_acc1", "max"),
    "modelnet40_8k_pointbert_llama": ("val_acc1", "max"),
    "scanobjectnn_hardest_pointbert": ("val_acc1", "max"),
    "scanobjectnn_hardest_pointbert_gcr": ("val_acc1", "max"),
    "scanobjectnn_hardest_pointbert_llama": ("val_acc1", "max"),
    "scanobjectnn_objbg_pointbert": ("val_acc1", "max"),
    "scanobjectnn_objbg_pointbert_gcr": ("val_acc1", "max"),
    "scanobjectnn_objbg_pointbert_llama": ("val_acc1", "max"),
    "scanobjectnn_objonly_pointbert": ("val_acc1", "max"),
    "scanobjectnn_objonly_pointbert_gcr": ("val_acc1", "max"),
    "scanobjectnn_objonly_pointbert_llama": ("val_acc1", "max"),
    "ssv2_videomae_base": ("val_acc1", "max"),
    "ssv2_videomae_base_gcr": ("val_acc1", "max"),
    "ssv2_videomae_base_llama": ("val_acc1", "max"),
    "ssv2_videomae_small": ("val_acc1", "max"),
    "ssv2_videomae_small_gcr": ("val_acc1", "max"),
    "ssv2_videomae_small_llama": ("val_acc1", "max"),
    "vqav2_meter": ("val_vqa_acc", "max"),
    "vqav2_meter_llama": ("val_vqa_acc", "max"),
}
# Where the old value named a metric the task never logs (a fit would have stopped at the first
# validation), the task's own metric replaces it: UTA logs val_zeroshot_acc1, not val_acc1.
FIXED = {"imagenet_uta_base_zeroshot": ("val_zeroshot_acc1", "max")}


def effective_checkpoints(config: Path) -> list[ModelCheckpoint]:
    """The ModelCheckpoints `frozenlm fit --config <config>` runs with: the printed config's callbacks,
    built, and what the CLI adds to them (`with_task_checkpoints`, as `instantiate_trainer` does)."""
    printed = yaml.safe_load(printed_config(config))
    callbacks = []
    for entry in printed["trainer"]["callbacks"] or []:
        module, name = entry["class_path"].rsplit(".", 1)
        callbacks.append(getattr(importlib.import_module(module), name)(**entry.get("init_args", {})))
    module, name = printed["model"]["class_path"].rsplit(".", 1)
    task = getattr(importlib.import_module(module), name)
    callbacks = with_task_checkpoints(callbacks, task, printed["trainer"].get("enable_checkpointing"))
    return [c for c in callbacks if isinstance(c, ModelCheckpoint)]


def test_every_recorded_config_is_still_shipped():
    assert set(MONITORED_AT_75A3724) <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_keeps_the_best_checkpoint_by_the_metric_it_monitored(config):
    """Configs no longer name their monitored metric: the task declares it, and each shipped config
    still keeps its best checkpoint by the same metric and mode (and its latest epoch's)."""
    checkpoints = effective_checkpoints(config)
    monitored = [(c.monitor, c.mode) for c in checkpoints if c.monitor]
    if config.stem in MONITORED_AT_75A3724:
        expected = FIXED.get(config.stem, MONITORED_AT_75A3724[config.stem])
    else:  # a config added since: its task's declaration (and no ModelCheckpoint of its own)
        module, name = yaml.safe_load(config.read_text())["model"]["class_path"].rsplit(".", 1)
        task = getattr(importlib.import_module(module), name)
        expected = (task.monitor, task.monitor_mode)
    assert monitored == ([expected] if expected else [])
    assert any(c.save_last for c in checkpoints)  # --ckpt_path last resumes


def test_fit_keeps_the_best_checkpoint_by_the_task_metric_unless_given_a_checkpoint(tmp_path):
    cli = run_cli("fit", "image_baseline", tmp_path / "default")
    best, last = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert (best.monitor, best.mode) == (cli.model.monitor, cli.model.monitor_mode) == ("val_acc1", "max")
    assert cli.model.monitor in cli.trainer.callback_metrics  # a metric the task logs
    assert Path(best.best_model_path).name.startswith("best-epoch000-acc1=") and Path(last.last_model_path).exists()

    given = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.monitor=val_loss",
             "--trainer.callbacks.mode=min"]  # fmt: skip
    cli = run_cli("fit", "image_baseline", tmp_path / "given", *given)
    assert [(c.monitor, c.mode) for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)] == [("val_loss", "min")]


@pytest.mark.parametrize("preset", sorted((REPO / "configs/trainer").glob("*.yaml")), ids=lambda p: p.name)
def test_trainer_presets_stack_on_a_config(preset, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(REPO / "configs/imagenet_deit_small_llama.yaml"), "--config", str(preset), "--print_config"])
    out = capsys.readouterr().out
    settings = yaml.safe_load(preset.read_text())
    for key, value in {**settings["trainer"], **settings.get("data", {}).get("init_args", {})}.items():
        assert f"  {key}: {value}\n" in out, key


@pytest.mark.parametrize("target", REPRODUCE_TARGETS)
def test_reproduce_target_command_parses(target, capsys):
    dry_run = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout
    commands = [line for line in dry_run.splitlines() if "frozenlm fit" in line or "frozenlm test" in line]
    assert commands, dry_run
    for line in commands:
        args = shlex.split(line.split("frozenlm", 1)[1])
        with pytest.raises(SystemExit) as exit_info:
            run([*args, "--print_config"])
        assert exit_info.value.code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.llm.chekpoint", "x"], "chekpoint"),
        (["--trainer.max_steps", "many"], "max_steps"),
        (["--model.llm.layers", "last"], "layers"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/demo.yaml"), *override, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_fit_validate_test_predict_through_the_cli(tmp_path, tiny_llama_checkpoint):
    llm = ["--model.llm.checkpoint", str(tiny_llama_checkpoint)]
    run_cli("fit", "image_llama", tmp_path, *llm)
    ckpt = last_checkpoint(tmp_path)
    state = load_checkpoint(ckpt)
    assert not [k for k in state["state_dict"] if k.startswith("model.llm_block.layers.")]
    assert any(k.startswith("model.llm_block.adapter_in") for k in state["state_dict"])
    assert state["frozen_lm"]["model.llm_block"]["source"] == str(tiny_llama_checkpoint)
    assert isinstance(state["hyper_parameters"]["llm"], dict)  # loadable with weights_only=True

    validate = run_cli("validate", "image_llama", tmp_path, *llm, "--ckpt_path", str(ckpt))
    assert 0.0 <= validate.trainer.callback_metrics["val_acc1"].item() <= 1.0
    test = run_cli("test", "image_llama", tmp_path, *llm, "--ckpt_path", str(ckpt))
    assert "test_acc5" in test.trainer.callback_metrics

    output = tmp_path / "predictions.csv"
    run_cli("predict", "image_llama", tmp_path, *llm, "--ckpt_path", str(ckpt), "--predictions.output", str(output))
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 2 * 16  # limit_predict_batches x batch_size
    assert rows[0]["id"].startswith("digits/") and len(eval(rows[0]["classes"])) == 5


def test_baseline_has_no_llm_block(tmp_path):
    cli = run_cli("fit", "image_baseline", tmp_path)
    assert cli.model.model.llm_block is None
    assert "frozen_lm" not in load_checkpoint(last_checkpoint(tmp_path)) or not load_checkpoint(
        last_checkpoint(tmp_path)
    )["frozen_lm"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # the configs' default; the reference's fp32 weights
def test_bf16_mixed_on_cpu(tmp_path, tiny_llama_checkpoint, dtype):
    cli = run_cli(
        "fit", "image_llama", tmp_path, "--model.llm.checkpoint", str(tiny_llama_checkpoint),
        "--model.llm.dtype", dtype, "--trainer.precision", "bf16-mixed",
    )  # fmt: skip
    block = cli.model.model.llm_block
    assert str(next(block.layers.parameters()).dtype) == f"torch.{dtype}"
    assert block.adapter_in.weight.dtype.is_floating_point and str(block.adapter_in.weight.dtype) == "torch.float32"
    assert cli.trainer.callback_metrics["train_loss"].isfinite()


def test_restore_follows_a_moved_source_and_refuses_a_different_block(tmp_path, tiny_llama_checkpoint):
    run_cli("fit", "image_llama", tmp_path, "--model.llm.checkpoint", str(tiny_llama_checkpoint))
    ckpt = last_checkpoint(tmp_path)
    # The same weights saved elsewhere (and in another format): restoring follows the new location.
    moved = save_checkpoint(build_tiny_lm("llama"), tmp_path / "moved", "safetensors")
    cli = run_cli("validate", "image_llama", tmp_path, "--model.llm.checkpoint", str(moved), "--ckpt_path", str(ckpt))
    assert cli.model.model.llm_block.source == str(moved)
    # Other weights: a clear refusal instead of silently training on a different block.
    other = save_checkpoint(build_tiny_lm("llama", seed=1), tmp_path / "other", "sharded")
    with pytest.raises(ValueError, match="trained with the frozen block"):
        run_cli("validate", "image_llama", tmp_path, "--model.llm.checkpoint", str(other), "--ckpt_path", str(ckpt))


@pytest.fixture(scope="module")
def baseline_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("baseline")
    run_cli("fit", "image_baseline", root)
    return last_checkpoint(root)


class PredictSteps(Callback):
    """Counts predict batches; fails (like a lost machine) when ``interrupt_at`` is reached."""

    count = 0

    def __init__(self, interrupt_at: int = -1) -> None:
        self.interrupt_at = interrupt_at

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.interrupt_at:
            raise RuntimeError("the machine went away")
        PredictSteps.count += 1


@pytest.mark.parametrize(
    "output, message",
    [("parent_is_a_file/predictions.csv", "Cannot write predictions to .*NotADirectoryError|FileExistsError"),
     ("predictions.txt", r"writes \.csv files, not \.txt")],
    ids=["parent-is-a-file", "unknown-suffix"],
)
def test_an_unwritable_prediction_output_fails_before_the_first_batch(tmp_path, baseline_checkpoint, output, message):
    (tmp_path / "parent_is_a_file").write_text("")
    PredictSteps.count = 0
    with pytest.raises(PredictionOutputError, match=message):
        run_cli("predict", "image_baseline", tmp_path, "--ckpt_path", str(baseline_checkpoint),
                "--predictions.output", str(tmp_path / output), "--trainer.callbacks+=tests.test_cli.PredictSteps")  # fmt: skip
    assert PredictSteps.count == 0


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_an_interrupted_predict_keeps_the_batches_it_finished(tmp_path, baseline_checkpoint, suffix):
    output = tmp_path / f"predictions{suffix}"
    with pytest.raises(RuntimeError, match="went away"):
        run_cli("predict", "image_baseline", tmp_path, "--ckpt_path", str(baseline_checkpoint), "--predictions.output",
                str(output), "--trainer.limit_predict_batches", "3", "--trainer.callbacks+=tests.test_cli.PredictSteps",
                "--trainer.callbacks.interrupt_at", "2")  # fmt: skip
    rows = json.loads(output.read_text()) if suffix == ".json" else list(csv.DictReader(output.open()))
    assert len(rows) == 2 * 16 and rows[0]["id"].startswith("digits/")
    complete = tmp_path / f"complete{suffix}"
    run_cli("predict", "image_baseline", tmp_path, "--ckpt_path", str(baseline_checkpoint), "--predictions.output", str(complete))
    full = json.loads(complete.read_text()) if suffix == ".json" else list(csv.DictReader(complete.open()))
    assert full == rows  # the same rows as an uninterrupted pass of those batches


def test_the_console_script_prints_a_data_error_as_one_line(tmp_path, monkeypatch, capsys):
    """A data error raised in `setup` (here a ModelNet40 listing with no shapes) prints one line, exit 2."""
    from tests.data.modelnet40.data import write

    root = write(tmp_path)
    (root / "modelnet40_train.txt").write_text("\n")
    monkeypatch.setattr("sys.argv", ["frozenlm", "fit", "--config", str(REPO / "tests/conf/pointcloud_llama.yaml"),
                                     "--data", "frozenlm.data.ModelNet40DataModule", "--data.root", str(root),
                                     "--model.llm", "null", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err[0].startswith(f"frozenlm: error: DatasetFileError: {root / 'modelnet40_train.txt'} lists no shape ids")
    assert len(err) == 2 and "FROZENLM_DEBUG=1" in err[1]


def one_line_error(monkeypatch, capsys, *args: str) -> str:
    """``frozenlm <args>`` through the console script: it must exit 2 with one error line (and the hint
    line); returns the error."""
    monkeypatch.setattr("sys.argv", ["frozenlm", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(err) == 2 and err[0].startswith("frozenlm: error: ") and "FROZENLM_DEBUG=1" in err[1], err
    return err[0].removeprefix("frozenlm: error: ")


# (command and what is wrong, the error): missing, damaged and other kinds of files, other checkpoints, bad options.
EXPORT_ERRORS = [
    ("export missing", r"ExportError: The checkpoint {dir}/missing.ckpt does not exist: give a .ckpt"),
    ("export folder", r"ExportError: The checkpoint {dir} is a folder"),
    ("export truncated", r"ExportError: The checkpoint {dir}/truncated.ckpt is damaged or not a Lightning checkpoint "
                         r"\(RuntimeError: .*\): .*; the newest intact checkpoint beside it is {dir}/intact.ckpt\.$"),
    ("export safetensors", r"ExportError: {dir}/weights.safetensors is damaged or not a Lightning checkpoint|"
                           r"ExportError: {dir}/weights.safetensors is not a Lightning checkpoint"),
    ("export state_dict", r"ExportError: {dir}/plain.pt is not a Lightning checkpoint \(it holds no state_dict\)"),
    ("export output_suffix", r"ExportError: --output {dir}/out.pt must end in .safetensors"),
    ("export output_unwritable", r"ExportError: Cannot write --output {dir}/a_file/model.safetensors \(.*Error: .*\): "
                                 r"choose another path\."),
    ("recompose missing", r"ExportError: The checkpoint {dir}/missing.ckpt does not exist"),
    ("recompose truncated", r"ExportError: The checkpoint {dir}/truncated.ckpt is damaged"),
    ("recompose not_decomposed", r"ExportError: {dir}/intact.ckpt is not a decomposed model: recompose needs a fit "
                                 r"with --model.learngene\."),
    ("recompose depth", r"ExportError: --depth must be at least 1, got 0\."),
    ("recompose output_suffix", r"ExportError: --output {dir}/out.pt must end in .safetensors"),
]


@pytest.mark.parametrize(("case", "expected"), EXPORT_ERRORS, ids=[case.replace(" ", "-") for case, _ in EXPORT_ERRORS])
def test_export_and_recompose_errors_are_one_line(case, expected, tmp_path, baseline_checkpoint, monkeypatch, capsys):
    """Missing, damaged and other kinds of files, other checkpoints, and bad options: one line, exit 2."""
    import torch
    from safetensors.torch import save_file

    intact = shutil.copy(baseline_checkpoint, tmp_path / "intact.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes(Path(intact).read_bytes()[:1000])
    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    (tmp_path / "a_file").write_text("")
    command, kind = case.split()
    checkpoint = {"missing": "missing.ckpt", "folder": "", "truncated": "truncated.ckpt", "safetensors": "weights.safetensors",
                  "state_dict": "plain.pt"}.get(kind, "intact.ckpt")  # fmt: skip
    output = {"output_suffix": "out.pt", "output_unwritable": "a_file/model.safetensors"}.get(kind, "model.safetensors")
    args = [command, "--checkpoint", str(tmp_path / checkpoint), "--output", str(tmp_path / output)]
    if command == "recompose":
        args += ["--depth", "0" if kind == "depth" else "2"]
    error = one_line_error(monkeypatch, capsys, *args)
    assert re.match(expected.format(dir=re.escape(str(tmp_path))), error), error
    assert not (tmp_path / "model.safetensors").exists()


def test_a_slurm_sweep_without_slurm_is_one_line_suggesting_the_local_launcher(tmp_path, monkeypatch, capsys):
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch, no srun
    error = one_line_error(monkeypatch, capsys, "sweep", "--preset", str(REPO / "configs/sweeps/demo.yaml"),
                           "--launcher", "slurm", "--output", str(tmp_path / "sweep"))  # fmt: skip
    assert error.startswith("SlurmNotFoundError: --launcher slurm submits with SLURM's sbatch and srun, and sbatch and "
                            "srun are not on PATH here"), error  # fmt: skip
    assert "--launcher local" in error
