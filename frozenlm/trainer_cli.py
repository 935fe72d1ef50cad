"""The trainer commands (`fit`, `validate`, `test`, `predict`): frozenlm's LightningCLI.

`run_trainer` is what the console script (`cli`) and sweeps ([`sweep`][frozenlm.sweep])
call to run one of them; this module imports neither.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from frozenlm.callbacks import PredictionWriter
from frozenlm.checkpoints import AtomicCheckpointIO, CheckpointDirectoryCheck, DamagedCheckpointError, check_checkpoint
from frozenlm.errors import ConfigurationError, FrozenLMError
from frozenlm.progress import ProgressLines, progress_bar
from frozenlm.rendezvous import Rendezvous, release_processes
from frozenlm.tasks import BaseTask

DESCRIPTION = """Frozen transformer blocks from pretrained language models inside visual encoders.

Trainer commands take YAML configs (class_path/init_args) and dotted overrides, e.g.
  frozenlm fit --config configs/cifar100_deit.yaml --model.llm.checkpoint PATH --trainer.max_steps 10"""


# Trainer defaults a config can override: TensorBoard logs, the learning rate per step and a summary of
# where the logs and checkpoints are. (Added in `instantiate_trainer`: the checkpoints of the best and the
# last epoch, `task_checkpoints`, unless the config or command line lists a ModelCheckpoint; and a progress
# display unless progress bars are off or a config brings its own: the rich bar in a terminal, plain lines
# otherwise, frozenlm.progress.)
TRAINER_DEFAULTS = {
    "trainer.logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "frozenlm"},
    },
    "trainer.callbacks": [
        {"class_path": "frozenlm.callbacks.RunSummary"},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    ],
}


def task_checkpoints(task: BaseTask | type[BaseTask]) -> list[ModelCheckpoint]:
    """The checkpoints a run keeps unless its config lists its own ModelCheckpoint: the best epoch by the
    metric the task declares (`task.monitor`, `task.monitor_mode`), and the latest epoch.

    Lightning writes last.ckpt only when another checkpoint is written, so the latest epoch gets its own
    checkpoint, with last.ckpt linking to it (what `--ckpt_path last` resumes)."""
    metric = task.monitor
    name = metric.removeprefix("val_")
    best = ModelCheckpoint(
        monitor=metric,
        mode=task.monitor_mode,
        filename=f"best-epoch{{epoch:03d}}-{name}={{{metric}:.4f}}",
        auto_insert_metric_name=False,
    )
    last = ModelCheckpoint(filename="epoch{epoch:03d}-step{step}", save_last="link", auto_insert_metric_name=False)
    return [best, last]


def with_task_checkpoints(callbacks: list, task: BaseTask | type[BaseTask], enable_checkpointing: bool | None) -> list:
    """`callbacks` and `task_checkpoints`, unless they list a ModelCheckpoint (a config or command
    line that names one keeps only those it names) or checkpointing is off."""
    if enable_checkpointing is False or any(isinstance(c, ModelCheckpoint) for c in callbacks):
        return list(callbacks)
    return [*callbacks, *task_checkpoints(task)]


class FrozenLMCLI(LightningCLI):
    """LightningCLI with the dataset's class count (SQA3D's: answers, point features, mean box sizes) linked
    into the model, a predictions writer, progress as lines where the output is not a terminal
    (`--progress.*`), and deliberate resumption (see `_parse_ckpt_path`)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # SQA3D: the answer vocabulary's size, the point features and the size clusters' mean sizes (a datamodule
        # without them links nothing)
        parser.link_arguments("data.num_answers", "model.init_args.num_answers", apply_on="instantiate")
        parser.link_arguments("data.input_feature_dim", "model.init_args.input_feature_dim", apply_on="instantiate")
        parser.link_arguments("data.mean_size", "model.init_args.mean_size", compute_fn=_as_lists, apply_on="instantiate")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_class_arguments(ProgressLines, "progress")  # used when stdout is not a terminal
        parser.add_class_arguments(Rendezvous, "rendezvous")  # --rendezvous.timeout, --rendezvous.log_every
        parser.set_defaults(TRAINER_DEFAULTS)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            raise ConfigurationError(error_reason(error)) from error

    def instantiate_trainer(self, **kwargs):
        """The trainer, with the task's checkpoints (`task_checkpoints`, unless the config lists a
        ModelCheckpoint or turns checkpointing off), a progress display (unless progress bars are off or the config brings one: the
        rich bar in a terminal, `ProgressLines` in a log file or pipe),
        atomic checkpoint writes (unless the config brings its own CheckpointIO), and a check that the
        checkpoint directories are writable before the first epoch."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(kwargs.pop("callbacks", None) or config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(progress_bar(self._get(self.config_init, "progress")))
        callbacks = with_task_checkpoints(callbacks, self.model, config.get("enable_checkpointing"))
        callbacks.append(CheckpointDirectoryCheck())
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        # Under DDP: say what a process waits for while the others have not come, and stop after a limit;
        # once the command has finished, leave the process group while Python is whole (`release_processes`;
        # not after an error, when a collective of this process may still wait for a peer that stopped).
        with self.config_init[subcommand]["rendezvous"].watch(self.trainer):
            super()._run_subcommand(subcommand)
        release_processes()

    def _parse_ckpt_path(self) -> None:
        """Resolve `--ckpt_path last` and re-apply the checkpoint's hyper-parameters, deliberately.

        `last` means the newest `last.ckpt` of this config's logger (save_dir/name/version_*), and
        the resumed run keeps logging into that version. Lightning then re-applies the model
        hyper-parameters stored in the checkpoint over the config and command line; we keep that (a
        resumed run must be the same model) but say which given values were overridden, and let the
        frozen block's source location (`llm.checkpoint`/`llm.revision`) follow the command line,
        since weights may move between machines; the block's fingerprint still guards its identity.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") == "last":
            found = _find_last_checkpoint(config)
            if found is not None:
                config.ckpt_path, version = found
                print(f"--ckpt_path last: resuming from {config.ckpt_path}")
                if config.trainer.logger and "init_args" in config.trainer.logger:
                    config.trainer.logger.init_args.version = version
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and not ckpt_path.startswith("registry"):
            if "://" not in ckpt_path:  # local files: say at once if the file is missing or damaged
                try:
                    check_checkpoint(ckpt_path)
                except DamagedCheckpointError as error:
                    raise ConfigurationError(str(error)) from error
        given = _model_args(config)
        super()._parse_ckpt_path()
        init_args = self.config[subcommand].model.init_args
        if init_args.get("llm") and given.get("llm"):
            for key in ("checkpoint", "revision"):
                init_args.llm[key] = given["llm"][key]
        resumed = _model_args(self.config[subcommand])
        for linked in ("num_classes", "num_answers", "input_feature_dim", "mean_size"):  # linked from the data, not given
            given.pop(linked, None)
        changed = _differences(given, resumed, "model")
        if changed:
            lines = "\n".join(f"  {key}: {used!r} from the checkpoint (given {old!r})" for key, old, used in changed)
            warnings.warn(
                f"{config.ckpt_path} was trained with other values than given; the checkpoint's are used:\n{lines}",
                stacklevel=1,
            )


def _as_lists(array: Any) -> list:
    """An array (a datamodule's `mean_size`) as nested lists of floats, as hyper-parameters hold it."""
    return [list(map(float, row)) for row in array]


def _differences(given: Any, used: Any, key: str) -> list[tuple[str, Any, Any]]:
    """`(dotted key, given, used)` for each leaf where two nested hyper-parameter dicts differ (keys
    only in `used` were not given, so they are not differences)."""
    if isinstance(given, dict) and isinstance(used, dict):
        return [d for k in given if k in used for d in _differences(given[k], used[k], f"{key}.{k}")]
    return [] if given == used else [(key, given, used)]


def error_reason(error: BaseException) -> str:
    """The innermost cause of `error` as `Type: message`: jsonargparse wraps the exception a class
    raised while being built from the config in a ValueError that lists every type it tried and dumps
    the whole config."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _model_args(config) -> dict:
    init_args = config.get("model", {}).get("init_args") or {}
    return init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)


def _find_last_checkpoint(config) -> tuple[str, int | str] | None:
    """The newest `last.ckpt` under the configured TensorBoard/CSV logger's versions, and its version;
    `last*.ckpt` links to deleted files are passed over, named in one line."""
    logger = config.trainer.get("logger")
    init_args = logger.get("init_args", {}) if logger and not isinstance(logger, bool) else {}
    save_dir = init_args.get("save_dir") or config.trainer.get("default_root_dir") or "."
    root = Path(save_dir) / (init_args.get("name") or "lightning_logs")
    found = list(root.glob("version_*/checkpoints/last*.ckpt"))
    dangling = [p for p in found if not p.exists()]  # links whose checkpoint was deleted
    if dangling:
        print(f"--ckpt_path last: ignoring {len(dangling)} link(s) to deleted checkpoints: {', '.join(map(str, dangling))}")
    candidates = sorted((p for p in found if p.exists()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        return None
    last = candidates[-1]
    version = last.parent.parent.name.removeprefix("version_")
    return str(last), int(version) if version.isdigit() else version



def run_trainer(args: list[str] | None = None, parser_kwargs: dict[str, Any] | None = None) -> FrozenLMCLI:
    """Run a trainer command (`sys.argv` when `args` is None) and return its LightningCLI;
    `parser_kwargs` go to the main parser (the console script's `--help` lists every command)."""
    return FrozenLMCLI(
        model_class=BaseTask,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"description": DESCRIPTION, **(parser_kwargs or {})},
        args=args,
    )
