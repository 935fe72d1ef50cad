"""`frozenlm sweep`: a grid of named variants x seeds over one base config, resumable, with one table.

A sweep preset (`configs/sweeps/*.yaml`):

    config: configs/demo.yaml          # the base config every run starts from
    args: [--trainer.max_epochs, "20"] # overrides for every run
    seeds: [0, 1, 2]
    metric: val_acc1                   # the validation metric compared, and whether higher is better
    mode: max
    baseline: baseline                 # the variant the others are paired against, seed by seed (or a
                                       # mapping variant -> its own baseline)
    coherence_every: 50                # gradient coherence measured every this many steps (0: off)
    test: true                         # also score each run on the test split with its last weights
    variants:                          # name -> CLI overrides
      baseline: [--model.llm, "null"]
      pretrained: []
      random: [--model.llm.init, random]

Each run is `frozenlm fit --config <config> <args> <variant overrides> --seed_everything <seed>`
(`{seed}` and `{output}` in the arguments become the run's seed and the sweep's folder, e.g. to
start from an earlier variant's checkpoint of the same seed: variants run in the preset's order),
logged under `<output>/<variant>/seed<seed>/` (TensorBoard, checkpoints and the run's resolved
`config.yaml`) and summarised in its `result.json` (written atomically) when it finishes. A run's
seed also seeds a random frozen block (`llm.seed`) unless the preset sets one; the data split stays
the datamodule's own (fixed) and is reported. Runs holding a readable `result.json` are never redone,
so a killed sweep resumes; a damaged one (truncated, empty, a key missing) is named and redone.
With `test: true` each run, once trained, is scored once on the datamodule's test split with its last
weights (the last checkpoint's: no selection on test); its `test_*` metrics go into `result.json`
(`test`) and the report compares them like the validation metric.

Where runs go (`launcher`): `inline`, one after another in this process (no start-up per run), or
with `gpus` one process per GPU; `slurm`, one job per run in a SLURM job array through `submitit`
(`--slurm.partition`, `--slurm.gpus_per_node`, ... `SlurmOptions`), each job one process per
GPU; `local`, the same job objects as local processes (submitit's local executor). A job that times
out or is preempted is resubmitted by submitit and resumes from the run's `last.ckpt`
(`SweepJob`). Each submitted run's `job.json` names its job and log files.

A run holds its folder while it trains: `run.lock` (its process id, host and time limit, created
atomically), removed when it ends. A run whose folder is held is never started again, by this sweep or
another: a lock of this host whose process has ended is stale and taken over (said in one line); one of
another host counts as held until the run's time limit (`--slurm.timeout_min` for `local` and
`slurm` jobs; inline runs have none) has passed, or `--force_unlock`. A run that ends writes
`outcome.json` beside `result.json` (atomically): `done`, or `failed` with the error's last line
and the log holding its traceback (the job's log, or the run's `error.log` inline). The report says of
every run whether it is done, pending, running (its folder held) or failed (with its log), whatever
launched it; it reads JSON and plain-text logs only, never a pickle. Failed runs do not stop the others;
the sweep then writes its report and ends with `SweepRunsFailedError` naming each (the CLI's
one-line error, exit status 2).

The report (`results.csv`, `results.md`, `results.png`) is rebuilt from the run folders alone
(`frozenlm sweep --report <output>`). Each variant is compared with the baseline seed by seed: the mean
difference, its 95 % t interval, the paired t-test's p-value and that p-value Holm-corrected for the
number of variants compared (a difference "survives" when the corrected p is below 0.05). Runs that are
missing, damaged or that never validated are listed by name under the table, not averaged.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import submitit
import torch
import yaml
from scipy import stats
from submitit.core.utils import JobPaths

from frozenlm.measure import flop_counter
from frozenlm.checkpoints import newest_intact_checkpoint
from frozenlm.errors import ConfigurationError, FrozenLMError
from frozenlm.files import create_partial, write_atomically

class SweepNotReadyError(FrozenLMError, FileNotFoundError):
    """No run of a sweep has finished yet; the message says where each one stands."""


class SweepRunsFailedError(FrozenLMError, RuntimeError):
    """Runs of a sweep failed (the others ran and are reported); the message names each, with the last line
    of its error and its log."""


class RunLockedError(FrozenLMError, RuntimeError):
    """A run's folder is held by another process (its `run.lock`); the message names the process."""


# What a finished run's result.json must hold for the report.
RESULT_KEYS = ("variant", "seed", "final", "best", "history", "trainable_params", "frozen_params",
               "flops_per_sample", "seconds_per_step", "coherence")  # fmt: skip


class SweepRecorder(L.Callback):
    """Records what a sweep reports of a run: the monitored metric after each validation, and the
    wall time of each training step."""

    def __init__(self, metric: str = "val_acc1") -> None:
        self.metric = metric
        self.history: list[float] = []
        self.step_seconds: list[float] = []
        self.first_step_at: float | None = None  # time.perf_counter() when training began
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = self._start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self._start)

    # After the validation epoch's end: metrics a task logs in its own on_validation_epoch_end (VQA accuracy,
    # retrieval recall, zero-shot accuracy) reach callback_metrics only after the callbacks' epoch-end hooks.
    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self.metric in trainer.callback_metrics:
            self.history.append(float(trainer.callback_metrics[self.metric]))

    # Kept in checkpoints, so that a run resumed after a preemption reports its whole history.
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "step_seconds": self.step_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history, self.step_seconds = list(state_dict["history"]), list(state_dict["step_seconds"])


def load_preset(path: str | Path) -> dict[str, Any]:
    preset = yaml.safe_load(Path(path).read_text())
    missing = {"config", "seeds", "variants"} - set(preset)
    if missing:
        raise ValueError(f"Sweep preset {path} lacks {sorted(missing)}; see `frozenlm sweep --help`.")
    preset.setdefault("args", [])
    preset.setdefault("metric", "val_acc1")
    preset.setdefault("mode", "max")
    preset.setdefault("coherence_every", 0)
    preset.setdefault("test", False)
    preset.setdefault("baseline", next(iter(preset["variants"])))
    baselines = preset["baseline"].values() if isinstance(preset["baseline"], dict) else [preset["baseline"]]
    unknown = [name for name in baselines if name not in preset["variants"]]
    if unknown:
        raise ValueError(f"Sweep preset {path}: baseline {unknown[0]!r} is not one of its variants.")
    return preset


def run_arguments(preset: dict[str, Any], variant: str, seed: int, output: Path) -> list[str]:
    """The `frozenlm fit` arguments of one run."""
    def filled(arguments: list[Any]) -> list[str]:
        return [str(a).replace("{seed}", str(seed)).replace("{output}", str(output)) for a in arguments]

    overrides = filled(preset["variants"][variant])
    args = ["fit", "--config", str(preset["config"]), *filled(preset["args"]), *overrides]
    args += ["--seed_everything", str(seed), "--trainer.logger.init_args.save_dir", str(output),
             "--trainer.logger.init_args.name", variant, "--trainer.logger.init_args.version", f"seed{seed}",
             "--trainer.default_root_dir", str(output / variant / f"seed{seed}")]  # fmt: skip
    given = [*filled(preset["args"]), *overrides]
    # Whether the run has a frozen block: the config's `llm`, then the last word on it in the arguments.
    config = yaml.safe_load(Path(preset["config"]).read_text()) if Path(preset["config"]).is_file() else {}
    has_block = ((config.get("model") or {}).get("init_args") or {}).get("llm") is not None
    for name, value in zip(given, [*given[1:], ""]):
        if name == "--model.llm" or name.startswith("--model.llm."):
            has_block = not (name == "--model.llm" and value == "null")
    pinned = any(a.startswith("--model.llm.seed") for a in given)
    if has_block and not pinned:
        args += ["--model.llm.seed", str(seed)]  # a random block differs with the seed too
    if preset["coherence_every"]:
        args += ["--trainer.callbacks+=frozenlm.analysis.GradientCoherenceCallback",
                 "--trainer.callbacks.every_n_steps", str(preset["coherence_every"])]  # fmt: skip
    return args + ["--trainer.callbacks+=frozenlm.sweep.SweepRecorder", "--trainer.callbacks.metric", preset["metric"]]


def run_one(
    preset: dict[str, Any], variant: str, seed: int, output: Path, extra_args: Sequence[str] = (), write: bool = True
) -> dict[str, Any]:
    """Train one run in this process (`extra_args` after its own) and write its `result.json`
    (unless `write` is False: a process other than the first of a multi-process job)."""
    from frozenlm.analysis import GradientCoherenceCallback
    from frozenlm.trainer_cli import run_trainer

    folder = run_folder(output, variant, seed)
    start = time.perf_counter()
    cli = run_trainer([*run_arguments(preset, variant, seed, output), *extra_args])
    seconds = time.perf_counter() - start
    if not write:  # the job's first process reports the run
        return {}
    model, trainer = cli.model, cli.trainer
    recorder = next(c for c in trainer.callbacks if isinstance(c, SweepRecorder))
    best = getattr(trainer.checkpoint_callback, "best_model_score", None)
    coherence = next((c.history for c in trainer.callbacks if isinstance(c, GradientCoherenceCallback)), {})
    datamodule = trainer.datamodule
    # The last weights (what last.ckpt holds), scored once on the test split: no selection on test.
    test = {k: float(v) for k, v in trainer.test(model, datamodule=datamodule, verbose=False)[0].items()} \
        if preset.get("test") else None
    flops, flops_error = flops_per_sample(model, datamodule)
    if flops_error is not None:  # the run's result stands without it
        warnings.warn(f"FLOPs per sample of {variant}/seed{seed} not counted: {flops_error}", stacklevel=2)
    result = {
        "variant": variant, "seed": seed, "metric": preset["metric"],
        "final": recorder.history[-1] if recorder.history else None,
        "best": (max if preset["mode"] == "max" else min)(recorder.history) if recorder.history else None,
        "best_checkpoint_score": float(best) if best is not None else None,
        "history": recorder.history,
        "test": test,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "flops_per_sample": flops, "flops_error": flops_error,
        "seconds_per_step": statistics.median(recorder.step_seconds[1:] or recorder.step_seconds or [math.nan]),
        "run_seconds": seconds,
        # Parsing, building the model (loading the LM layer), the data and the sanity check: what each
        # run pays before its first step, in this process (a separate process adds Python's start-up).
        "setup_seconds": recorder.first_step_at - start if recorder.first_step_at is not None else None,
        "coherence": {str(step): values for step, values in coherence.items()},
        "data_split": {k: getattr(datamodule, k) for k in ("val_fraction", "seed", "train_subset", "num_val") if hasattr(datamodule, k)},
        "config": str(folder / "config.yaml"),
    }  # fmt: skip
    write_atomically(folder / "result.json", json.dumps(result, indent=1))
    return result


def run_folder(output: Path, variant: str, seed: int) -> Path:
    return output / variant / f"seed{seed}"


def read_result(folder: Path) -> dict[str, Any] | str:
    """The run's `result.json`, or why there is none to use: `"missing"` or `"damaged: <reason>"`."""
    path = folder / "result.json"
    if not path.is_file():
        return "missing"
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"damaged: {type(error).__name__}: {error}"
    if not isinstance(result, dict):
        return f"damaged: holds a {type(result).__name__}, not a JSON object"
    absent = [key for key in RESULT_KEYS if key not in result]
    return f"damaged: no {', '.join(absent)}" if absent else result


@torch.no_grad()
def flops_per_sample(model: L.LightningModule, datamodule: L.LightningDataModule) -> tuple[int | None, str | None]:
    """`(FLOPs, None)`: the model's inference forward FLOPs on one validation sample (its task's
    `sample_forward`: matmuls, convolutions and attention, eval mode); `(None, why)` when they cannot be
    counted (a model without `sample_forward`, no validation batch, a failing forward)."""
    if not hasattr(model, "sample_forward"):
        return None, f"{type(model).__name__} has no sample_forward"
    training = model.training
    try:
        batch = next(iter(datamodule.val_dataloader()))
        batch = datamodule.on_after_batch_transfer(model.transfer_batch_to_device(batch, model.device, 0), 0)
        function, inputs = model.sample_forward(batch)
        model.eval()
        with flop_counter() as counter:
            function(*inputs)
    except Exception as error:  # noqa: BLE001 (reported in result.json and as a warning)
        return None, _last_line(error)
    finally:
        model.train(training)
    return counter.get_total_flops(), None


def _last_line(error: BaseException) -> str:
    """`<Type>: <the last line of its message>`."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1].strip()}" if lines else type(error).__name__


# -- who holds a run folder, and how its run ended ------------------------------------------------
LOCK, OUTCOME, ERROR_LOG = "run.lock", "outcome.json", "error.log"


def _process_start(pid: int) -> str | None:
    """When process `pid` of this host started (Linux's `/proc`; None elsewhere or when it is gone):
    tells a live holder from a later process given the same id."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` of this host runs (and is the one that started at `started`, when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def lock_state(folder: Path, job: str | None = None) -> tuple[str, str] | None:
    """The run folder's lock: None when there is none; `("held", who)` while its process of this host
    runs; `("held elsewhere", who)` for a process of another host before the run's time limit has passed
    (with none, until `--force_unlock`) or an unreadable lock; else `("stale", why)`, as is an earlier
    attempt of `job` (a requeued job) on any host."""
    path = folder / LOCK
    try:
        lock = json.loads(path.read_text())
        pid, host, started, limit = int(lock["pid"]), str(lock["host"]), float(lock["started"]), lock.get("limit_s")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return "held elsewhere", f"an unreadable lock {path} ({type(error).__name__})"
    who = f"process {pid} on {host} since {_utc(started)}"
    if host == socket.gethostname():
        return ("held", who) if _alive(pid, lock.get("process_start")) else ("stale", f"{who}, which has ended")
    if job is not None and lock.get("job") == job:
        return "stale", f"{who}, an earlier attempt of job {job}"
    if limit is not None and time.time() > started + float(limit):
        return "stale", f"{who}, past the run's time limit"
    until = f"until {_utc(started + float(limit))}" if limit is not None else "with no time limit"
    return "held elsewhere", f"{who} (another host: held {until} or until --force_unlock)"


@contextmanager
def hold_run(folder: Path, limit_s: float | None = None, job: str | None = None) -> Iterator[None]:
    """Hold the run folder for the block: create its `run.lock` (atomically: a complete file linked
    into place, which fails when one exists), taking over a stale one (said in one line), and remove it
    after. Raises `RunLockedError` when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path, token = folder / LOCK, uuid.uuid4().hex
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "limit_s": limit_s,
              "job": job, "process_start": _process_start(os.getpid()), "token": token}  # fmt: skip
    partial = create_partial(path)  # with the permissions a plain write gives: colleagues can read who holds it
    try:
        Path(partial).write_text(json.dumps(record, indent=1))
        for _ in range(3):
            try:
                os.link(partial, path)
                break
            except FileExistsError:
                state = lock_state(folder, job)
                if state is not None and state[0] != "stale":
                    raise RunLockedError(
                        f"{folder} is held by {state[1]} ({path}): a run is never started twice. Wait for it or "
                        "stop that process; for another host's process that has ended: `frozenlm sweep ... --force_unlock true`."
                    ) from None
                if state is not None:
                    print(f"Taking over the stale lock of {folder}: {state[1]}", flush=True)
                    path.unlink(missing_ok=True)
        else:
            raise RunLockedError(f"{folder}: its lock {path} keeps reappearing; another process is starting this run.")
    finally:
        Path(partial).unlink(missing_ok=True)
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text()).get("token") == token:
                path.unlink()
        except (OSError, ValueError):
            pass


def write_outcome(folder: Path, status: str, error: str | None = None, log: str | None = None,
                  job: str | None = None) -> None:  # fmt: skip
    """The run's `outcome.json` (atomically): `done`, or `failed` with the error's last line and the log
    holding its traceback."""
    record = {"status": status, "error": error, "log": log, "job": job, "host": socket.gethostname(),
              "pid": os.getpid(), "finished": time.time()}  # fmt: skip
    write_atomically(folder / OUTCOME, json.dumps(record, indent=1))


def read_outcome(folder: Path) -> dict[str, Any] | None:
    """The run's `outcome.json` (None when absent or unreadable)."""
    try:
        outcome = json.loads((folder / OUTCOME).read_text())
    except (OSError, ValueError):
        return None
    return outcome if isinstance(outcome, dict) else None


def run_recorded(preset: dict[str, Any], variant: str, seed: int, output: Path, extra_args: Sequence[str] = (),
                 write: bool = True, limit_s: float | None = None, job: str | None = None,
                 log: str | None = None) -> dict[str, Any]:  # fmt: skip
    """`run_one` holding the run's folder (`hold_run`), recording how it ended in
    `outcome.json`: a failure's last line, and its traceback in `log` (default: the run's
    `error.log`), then re-raised. An interruption (Ctrl-C, a preempted job's exit) records nothing: the
    run resumes. `write` False (a process other than the first of a multi-process job): run_one alone."""
    if not write:
        return run_one(preset, variant, seed, output, extra_args, write=False)
    folder = run_folder(output, variant, seed)
    with hold_run(folder, limit_s, job):
        (folder / OUTCOME).unlink(missing_ok=True)
        try:
            result = run_one(preset, variant, seed, output, extra_args)
        except Exception as error:
            if log is None:
                log = str(folder / ERROR_LOG)
                write_atomically(log, "".join(traceback.format_exception(error)))
            write_outcome(folder, "failed", _last_line(error), log, job)
            raise
        write_outcome(folder, "done", log=log, job=job)
    return result


class SlurmNotFoundError(FrozenLMError, RuntimeError):
    """`--launcher slurm` on a machine without SLURM's commands; the message suggests `--launcher local`."""


@dataclasses.dataclass
class SlurmOptions:
    """How `--launcher slurm` submits runs (submitit's SLURM parameters); each run is one job of a job
    array, with one process per GPU (`srun`; Lightning reads the SLURM environment).

    Args:
        partition, account, qos, constraint: SLURM's own (None: the cluster's default).
        nodes: nodes per run (`--trainer.num_nodes`).
        gpus_per_node: GPUs per node and run, one process each (`--trainer.devices`).
        cpus_per_task: CPU cores per process, for its loader workers (see docs/many_gpus.md).
        mem_gb: memory per node; None = the partition's default.
        timeout_min: time limit of one job; a run that needs longer is resubmitted and resumes.
        max_requeues: resubmissions after a timeout or a preemption before the run counts as failed.
        array_parallelism: at most this many runs of the sweep at once.
        setup: shell lines run before each job (`module load ...`, `source .venv/bin/activate`).
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 10
    mem_gb: int | None = None
    timeout_min: int = 24 * 60
    max_requeues: int = 3
    array_parallelism: int = 64
    setup: list[str] = dataclasses.field(default_factory=list)

    def executor(self, folder: Path) -> submitit.AutoExecutor:
        import shutil

        missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise SlurmNotFoundError(
                f"--launcher slurm submits with SLURM's sbatch and srun, and {' and '.join(missing)} {verb} not on PATH "
                "here: run the sweep on a SLURM login node, or on this machine with --launcher local (one process per run)."
            )
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=self.max_requeues)
        named = {"partition": self.partition, "account": self.account, "qos": self.qos, "constraint": self.constraint,
                 "mem": f"{self.mem_gb}GB" if self.mem_gb else None}  # fmt: skip
        executor.update_parameters(
            name="frozenlm-sweep", nodes=self.nodes, tasks_per_node=self.gpus_per_node, gpus_per_node=self.gpus_per_node,
            cpus_per_task=self.cpus_per_task, timeout_min=self.timeout_min, slurm_array_parallelism=self.array_parallelism,
            slurm_setup=self.setup, **{f"slurm_{key}": value for key, value in named.items() if value is not None},
        )  # fmt: skip
        return executor

    def trainer_args(self) -> list[str]:
        return ["--trainer.devices", str(self.gpus_per_node), "--trainer.num_nodes", str(self.nodes)]


class SweepJob(submitit.helpers.Checkpointable):
    """One run of a sweep as a submitit job. It starts from the run's `last.ckpt` when there is one:
    when a job times out or is preempted, submitit calls `checkpoint` (a resubmission of this same
    job) and requeues it, and the next attempt resumes from the last epoch-end checkpoint."""

    def __init__(self, preset: dict[str, Any], output: Path, variant: str, seed: int, trainer_args: Sequence[str] = (),
                 limit_s: float | None = None):  # fmt: skip
        self.preset, self.output, self.variant, self.seed = preset, Path(output), variant, seed
        self.trainer_args, self.limit_s = list(trainer_args), limit_s  # limit_s: the job's time limit

    def __call__(self) -> str:
        folder = run_folder(self.output, self.variant, self.seed)
        args = list(self.trainer_args)
        last = newest_intact_checkpoint(folder / "checkpoints")
        if last is not None:
            print(f"Resuming {self.variant}/seed{self.seed} from {last}", flush=True)
            args += ["--ckpt_path", str(last)]
        env = submitit.JobEnvironment()
        limit_s = getattr(self, "limit_s", None)  # None in a job submitted by an earlier frozenlm
        run_recorded(self.preset, self.variant, self.seed, self.output, args, write=env.global_rank == 0,
                     limit_s=limit_s, job=f"{env.name()} job {env.job_id}", log=str(env.paths.stderr))  # fmt: skip
        return str(folder / "result.json")


def submit(preset: dict[str, Any], folder: Path, runs: list[tuple[str, int]], launcher: str,
           slurm: SlurmOptions, parallel: int) -> list[submitit.Job]:  # fmt: skip
    """Submit each run as a `SweepJob` (SLURM: one job array), recording its `job.json`; with the
    local executor, at most `parallel` at once, waiting for them all."""
    jobs_folder = folder / "jobs"
    if not runs:
        return []
    if launcher == "slurm":
        executor, trainer_args = slurm.executor(jobs_folder), slurm.trainer_args()
        with executor.batch():
            pending = [(run, executor.submit(SweepJob(preset, folder, *run, trainer_args, 60 * slurm.timeout_min)))
                       for run in runs]  # fmt: skip
        for run, job in pending:
            record_job(folder, run, job, launcher)
        return [job for _, job in pending]
    executor = submitit.AutoExecutor(folder=jobs_folder, cluster="local")
    executor.update_parameters(timeout_min=slurm.timeout_min, gpus_per_node=0)
    running: list[submitit.Job] = []
    done: list[submitit.Job] = []
    for run in runs:
        while len(running) >= parallel:
            time.sleep(0.5)
            finished = [job for job in running if job.done()]
            done += finished
            running = [job for job in running if job not in finished]
        job = executor.submit(SweepJob(preset, folder, *run, limit_s=60 * slurm.timeout_min))
        record_job(folder, run, job, launcher)
        running.append(job)
    for job in running:
        job.wait()
    return done + running


def record_job(folder: Path, run: tuple[str, int], job: submitit.Job, launcher: str) -> None:
    paths = JobPaths(job.paths.folder, job.job_id)
    record = {"launcher": launcher, "job_id": job.job_id, "folder": str(job.paths.folder),
              "stdout": str(paths.stdout), "stderr": str(paths.stderr), "submitted": time.time(),
              "host": socket.gethostname()}  # fmt: skip
    if launcher == "local":  # the job's id is its controlling process's
        record["process_start"] = _process_start(int(job.job_id))
    run_dir = run_folder(folder, *run)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / "job.json", json.dumps(record, indent=1))


def _last_log_line(path: str) -> str | None:
    """The last line of a plain-text log naming an error (`...Error: ...`), if any."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 65536))
            lines = file.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip() for line in reversed(lines) if "Error: " in line or "Exception: " in line), None)


# SLURM job states (sacct) -> the report's words.
_SLURM_STATES = {"PENDING": "pending", "REQUEUED": "pending", "CONFIGURING": "pending", "RESIZING": "pending",
                 "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running"}  # fmt: skip


def run_status(folder: Path) -> str | None:
    """Where a run without a usable `result.json` stands: `running (<who holds its folder>)`,
    `failed (<error>; log: <path>)` from its `outcome.json`, else what its `job.json` says
    (`job_status`); None when it never started. Reads JSON and plain-text logs only."""
    state = lock_state(folder)
    if state is not None and state[0] != "stale":
        return f"running ({state[1]})"
    outcome = read_outcome(folder)
    if outcome is not None and outcome.get("status") == "failed":
        job = f"{outcome['job']}: " if outcome.get("job") else ""
        return f"failed ({job}{outcome.get('error')}; log: {outcome.get('log')})"
    return job_status(folder)


def job_status(folder: Path) -> str | None:
    """Where a submitted run stands by its `job.json`: `pending (...)`, `running (...)` or `failed
    (...; log: <path>)` from the job's process (local) or SLURM's job state; None when never submitted."""
    try:
        record = json.loads((folder / "job.json").read_text())
    except (OSError, ValueError):
        return None
    job_id, log = record["job_id"], record["stderr"]
    if record["launcher"] == "local":
        here = record.get("host", socket.gethostname()) == socket.gethostname()
        if here and str(job_id).isdigit() and _alive(int(job_id), record.get("process_start")):
            return f"running (local job {job_id}; log: {log})"
        return f"failed (local job {job_id}: {_last_log_line(log) or 'its process ended without a result'}; log: {log})"
    state = submitit.SlurmJob(record["folder"], job_id).state.split()[0]
    word = _SLURM_STATES.get(state, "failed")
    return f"{word} (slurm job {job_id}, {state}" + (f"; log: {log})" if word != "pending" else ")")


def sweep(
    preset: str | None = None,
    output: str | None = None,
    launcher: Literal["inline", "local", "slurm"] = "inline",
    gpus: list[int] | None = None,
    slurm: SlurmOptions = SlurmOptions(),  # noqa: B008 (read only)
    parallel: int = 1,
    report: str | None = None,
    report_to: str | None = None,
    force_unlock: bool = False,
) -> Path:
    """Run a sweep preset (see the module docstring), then write its report; or only rebuild a report.

    Args:
        preset: the sweep preset (`configs/sweeps/*.yaml`); not needed with `report`.
        output: where runs go; default `runs/sweeps/<preset name>`.
        launcher: `inline` (this process, or one process per GPU with `gpus`), `slurm` (a submitit
            job array, returns once submitted; `--report` later) or `local` (the same jobs as local
            processes, waited for).
        gpus: with `inline`: GPU indices to spread runs over, one process each.
        slurm: the SLURM resources of each run (`--slurm.partition`, `--slurm.gpus_per_node`, ...);
            `timeout_min` also limits each `local` job.
        parallel: with `local`: runs at once.
        report: rebuild the report of this sweep folder from its runs, and run nothing.
        report_to: with `report`: write the report's files into this folder instead of the sweep's
            (which is then only read), e.g. `docs/evidence/<regime>`.
        force_unlock: remove the locks (`run.lock`) of runs held by another host's process before their
            time limit, or unreadable ones, and start those runs: only when that process is known to have
            ended. (A lock of this host whose process has ended is taken over without it.)

    Raises:
        SweepRunsFailedError: after the report, when runs failed; it names each with its error and log.

    Examples:
        From the command line (the offline demo sweep, resumable):
        `frozenlm sweep --preset configs/sweeps/demo.yaml --output runs/sweeps/demo`, then
        `frozenlm sweep --report runs/sweeps/demo` for its table and plots.
    """
    if report_to is not None and report is None:
        raise ConfigurationError("ConfigurationError: --report_to goes with --report <sweep folder>: it says where "
                                 "that report's files go; add --report, or drop --report_to.")
    if report is not None:
        return write_report(Path(report), Path(report_to) if report_to else None)
    if preset is None:
        raise ValueError("Give a sweep preset (--preset configs/sweeps/<name>.yaml) or --report <sweep folder>.")
    if launcher not in ("inline", "local", "slurm"):
        raise ValueError(f"launcher must be inline, local or slurm, got {launcher!r}.")
    if gpus and launcher != "inline":
        raise ValueError(f"--gpus spreads inline runs; with --launcher {launcher} give --slurm.gpus_per_node.")
    config, preset = preset, load_preset(preset)
    folder = Path(output) if output else Path("runs/sweeps") / Path(config).stem
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
    pending, runs = [], expected_runs(preset)
    for variant, seed in runs:
        run_dir = run_folder(folder, variant, seed)
        status = read_result(run_dir)
        if not isinstance(status, str):
            continue
        state = lock_state(run_dir)
        if state is not None and state[0] == "held elsewhere" and force_unlock:
            print(f"Removing the lock of {variant}/seed{seed} (--force_unlock): {state[1]}")
            (run_dir / LOCK).unlink(missing_ok=True)
        elif state is not None and state[0] != "stale":
            print(f"Not starting {variant}/seed{seed}: running ({state[1]})")
            continue
        job = job_status(run_dir) if launcher != "inline" else None
        if job is not None and not job.startswith("failed"):
            print(f"Not starting {variant}/seed{seed} again: {job}")
            continue
        pending.append((variant, seed))
        (run_dir / OUTCOME).unlink(missing_ok=True)  # a failure of an earlier attempt no longer says where it stands
        if status != "missing":
            print(f"Redoing {variant}/seed{seed}: its result.json is {status}")
    total = len(runs)
    print(f"Sweep {config}: {total - len(pending)} of {total} runs done or under way, {len(pending)} to run, in {folder}")
    if launcher != "inline":
        jobs = submit(preset, folder, pending, launcher, slurm, parallel)
        if launcher == "slurm":
            print(f"Submitted {len(jobs)} SLURM jobs (logs in {folder / 'jobs'}); `frozenlm sweep --report {folder}` "
                  "says which are pending, running, failed or done.")  # fmt: skip
            return folder
    elif gpus:
        def launch(job: tuple[int, tuple[str, int]]) -> None:
            gpu, (variant, seed) = job
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpus[gpu % len(gpus)])}
            command = [sys.executable, "-m", "frozenlm.sweep", str(config), str(folder), variant, str(seed)]
            code = subprocess.run(command, env=env).returncode
            run_dir = run_folder(folder, variant, seed)
            unheld = (lock_state(run_dir) or ("stale",))[0] == "stale"
            if code and unheld and read_outcome(run_dir) is None:  # it died before recording how it ended
                write_outcome(run_dir, "failed", f"its process ended with exit status {code}", log="(this sweep's output)")

        with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
            list(pool.map(launch, enumerate(pending)))
    else:
        for variant, seed in pending:
            try:
                run_recorded(preset, variant, seed, folder)
            except RunLockedError as error:
                print(f"Not starting {variant}/seed{seed}: {error}", file=sys.stderr)
            except Exception as error:  # noqa: BLE001 (recorded in the run's outcome.json; the others still run)
                print(f"Sweep run {variant}/seed{seed} failed: {_last_line(error)} (traceback: "
                      f"{run_folder(folder, variant, seed) / ERROR_LOG}); going on with the next runs.", file=sys.stderr)  # fmt: skip
            except BaseException:
                print(f"Sweep interrupted during {variant}/seed{seed} ({run_folder(folder, variant, seed)}); running "
                      "it again resumes with that run.", file=sys.stderr)  # fmt: skip
                raise
    failed = [f"{v}/seed{s} ({status})" for v, s in runs
              if not isinstance(read_result(run_folder(folder, v, s)), dict)
              and (status := run_status(run_folder(folder, v, s)) or "").startswith("failed")]  # fmt: skip
    try:
        write_report(folder)
    except SweepNotReadyError:
        if not failed:
            raise
    if failed:
        raise SweepRunsFailedError(
            f"{len(failed)} of {total} runs of {folder} failed: {'; '.join(failed)}. The report covers the others; "
            f"fix the cause and run the same `frozenlm sweep` again to redo them."
        )
    return folder


def expected_runs(preset: dict[str, Any]) -> list[tuple[str, int]]:
    """Every (variant, seed) of the preset, seed by seed (every variant of a seed before the next seed), so a
    sweep stopped part-way holds complete seeds that compare every variant."""
    return [(variant, seed) for seed in preset["seeds"] for variant in preset["variants"]]


def summarize(results: list[dict[str, Any]], baseline: str | dict[str, str]) -> list[dict[str, Any]]:
    """One row per variant: mean and sample sd over seeds of the final and best metric; the paired
    difference of the final metric to `baseline` (or to the variant's own, a mapping; seeds both have) with its 95 % t interval, the paired
    t-test's two-sided p-value and that p Holm-corrected over the variants compared; sizes, time per step,
    and the mean gradient coherence at each measured step. `results` are runs with a metric."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for result in results:
        by_variant.setdefault(result["variant"], {})[result["seed"]] = result
    rows = []
    for variant, runs in by_variant.items():
        finals = [r["final"] for r in runs.values()]
        bests = [r["best"] for r in runs.values()]
        base = baseline.get(variant) if isinstance(baseline, dict) else baseline
        paired = [r["final"] - by_variant[base][s]["final"] for s, r in runs.items() if s in by_variant.get(base, {})]
        compared = bool(paired) and base != variant
        diff_mean, half = statistics.mean(paired) if paired else math.nan, _half_interval(paired)
        test_metric = next((k for r in runs.values() for k in (r.get("test") or {}) if k == _test_name(r["metric"])), None)
        row = {
            "variant": variant, "baseline": base if compared else None, "seeds": len(runs),
            "final_mean": statistics.mean(finals), "final_sd": _sd(finals),
            "best_mean": statistics.mean(bests), "best_sd": _sd(bests),
            "pairs": len(paired) if compared else 0, "diff_mean": diff_mean, "diff_ci95": half, "diff_low": diff_mean - half, "diff_high": diff_mean + half,
            "p_value": _paired_p(paired) if compared else math.nan,
            "trainable_params": next(iter(runs.values()))["trainable_params"],
            "frozen_params": next(iter(runs.values()))["frozen_params"],
            "flops_per_sample": next(iter(runs.values()))["flops_per_sample"],
            "ms_per_step": 1e3 * statistics.mean(r["seconds_per_step"] for r in runs.values()),
            "setup_s": statistics.mean(r.get("setup_seconds") or math.nan for r in runs.values()),
        }  # fmt: skip
        if test_metric is not None:  # the same comparison on the test split (last weights), seed by seed
            tests = {s: r["test"][test_metric] for s, r in runs.items() if test_metric in (r.get("test") or {})}
            base_tests = {s: (r.get("test") or {}).get(test_metric) for s, r in by_variant.get(base, {}).items()}
            tpaired = [v - base_tests[s] for s, v in tests.items() if base_tests.get(s) is not None]
            tmean, thalf = statistics.mean(tpaired) if tpaired else math.nan, _half_interval(tpaired)
            row.update({"test_metric": test_metric, "test_seeds": len(tests), "test_pairs": len(tpaired) if compared else 0,
                        "test_mean": statistics.mean(tests.values()),
                        "test_sd": _sd(list(tests.values())), "test_diff_mean": tmean, "test_diff_ci95": thalf,
                        "test_diff_low": tmean - thalf, "test_diff_high": tmean + thalf,
                        "test_p_value": _paired_p(tpaired) if compared and tpaired else math.nan})  # fmt: skip
        for name in COHERENCE_SUMMARY:  # GCR's mechanism: each run's coherence over training, then over seeds
            per_seed = {s: v for s, r in runs.items() if math.isfinite(v := run_coherence(r, name))}
            if per_seed:
                base_runs = by_variant.get(base, {})
                cpaired = [v - run_coherence(base_runs[s], name) for s, v in per_seed.items() if s in base_runs]
                cpaired = [d for d in cpaired if math.isfinite(d)] if compared else []
                cmean, chalf = statistics.mean(cpaired) if cpaired else math.nan, _half_interval(cpaired)
                row.update({f"{name}_mean": statistics.mean(per_seed.values()), f"{name}_sd": _sd(list(per_seed.values())),
                            f"{name}_seeds": len(per_seed), f"{name}_diff_mean": cmean,
                            f"{name}_diff_low": cmean - chalf, f"{name}_diff_high": cmean + chalf})  # fmt: skip
        steps = sorted({int(step) for r in runs.values() for step in r["coherence"]})
        for step in steps:
            for name in ("m_coherence", "mean_cosine"):
                values = [v for r in runs.values() for k, v in r["coherence"].get(str(step), {}).items() if k.endswith(f"/{name}")]
                if values:
                    row[f"{name}@{step}"] = statistics.mean(values)
        rows.append(row)
    _holm(rows, "p_value", "p_holm")
    _holm(rows, "test_p_value", "test_p_holm")
    return rows


# The coherence measures the report summarises per variant (`grad_coherence/<name>` in result.json).
COHERENCE_SUMMARY = ("m_coherence", "mean_cosine")


def run_coherence(result: dict[str, Any], name: str) -> float:
    """One run's gradient coherence `name` over training: the mean of its values at the recorded steps
    after step 0 (step 0 is the initialisation, before any update; it counts only when no later step was
    recorded); nan when the run recorded none."""
    by_step = {int(step): [v for k, v in values.items() if k.endswith(f"/{name}") and v is not None]
               for step, values in (result.get("coherence") or {}).items()}  # fmt: skip
    by_step = {step: values for step, values in by_step.items() if values}
    trained = [v for step, values in by_step.items() if step > 0 for v in values]
    values = trained or [v for values in by_step.values() for v in values]
    return statistics.mean(values) if values else math.nan


def _holm(rows: list[dict[str, Any]], key: str, out: str) -> None:
    """Holm's step-down correction of the p-values `rows[*][key]` (those present and finite) into `out`."""
    tested = sorted((r for r in rows if math.isfinite(r.get(key, math.nan))), key=lambda r: r[key])
    running = 0.0
    for rank, row in enumerate(tested):  # Holm's step-down: (m - rank) x p, kept monotone, at most 1
        running = max(running, min(1.0, (len(tested) - rank) * row[key]))
        row[out] = running
    for row in rows:
        if key in row:
            row.setdefault(out, math.nan)


def _test_name(metric: str) -> str:
    """The test split's name of a validation metric: `val_acc1` -> `test_acc1`."""
    return "test_" + metric.removeprefix("val_")


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _half_interval(values: list[float]) -> float:
    """Half-width of the 95 % Student-t interval of the mean of `values`."""
    if len(values) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def _paired_p(differences: list[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean of `differences` is 0 (nan below 2 pairs, or
    when every difference is the same)."""
    if len(differences) < 2 or len(set(differences)) == 1:
        return math.nan
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def write_report(folder: Path, into: Path | None = None) -> Path:
    """`results.csv`, `results.md`, `results.png`, `accuracy.png` and `coherence.png` of the runs
    under `folder`, written into `into` (default: `folder`; nothing is then written under `folder`).
    Reads `sweep.yaml` and each run's `result.json` (JSON only). Works on a sweep part-way: runs not
    finished yet are listed as pending, runs damaged or without the metric are listed by name, and each
    paired comparison uses the seeds both variants have. Returns `into`."""
    into = Path(into) if into is not None else folder
    preset = yaml.safe_load((folder / "sweep.yaml").read_text())
    metric = preset.get("metric", "val_acc1")
    results, left_out = [], []
    for variant, seed in expected_runs(preset):
        status = read_result(run_folder(folder, variant, seed))
        if isinstance(status, dict) and status["final"] is None:
            status = f"no {metric}: it never validated"
        if isinstance(status, dict):
            results.append(status)
        else:
            left_out.append(f"{variant}/seed{seed} ({run_status(run_folder(folder, variant, seed)) or status})")
    if not results:
        raise SweepNotReadyError(f"No finished run with a {metric} under {folder} yet: " + "; ".join(left_out) + ".")
    into.mkdir(parents=True, exist_ok=True)
    order = list(preset["variants"])
    rows = sorted(summarize(results, preset["baseline"]), key=lambda r: order.index(r["variant"]) if r["variant"] in order else 99)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    baseline_name = "its baseline" if isinstance(preset["baseline"], dict) else preset["baseline"]
    with (into / "results.csv").open("w", newline="") as file:  # quoted where a value holds a comma or quote
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_csv(row.get(c)) for c in columns] for row in rows)
    compared = sum(math.isfinite(r["p_value"]) for r in rows)
    expected = len(expected_runs(preset))
    lines = [
        f"Finished runs: {len(results)} of {expected} ({len(preset['variants'])} variants x {len(preset['seeds'])} seeds).",
        "",
        f"| variant | seeds | final {metric} | best {metric} | vs {baseline_name} (paired mean [95 % CI]) | "
        f"p | Holm p ({compared}) | trainable | frozen | GFLOP/sample | ms/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        diff = "-" if r["baseline"] is None else (
            _interval(r["diff_mean"], r["diff_low"], r["diff_high"], ".4f") + _pairs(r["pairs"], r["seeds"])
            + (f" vs {r['baseline']}" if isinstance(preset["baseline"], dict) else ""))  # fmt: skip
        flops = f"{r['flops_per_sample'] / 1e9:.3f}" if r["flops_per_sample"] else "-"
        survives = "*" if r["p_holm"] < 0.05 else ""
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {r['final_mean']:.4f} ± {r['final_sd']:.4f} | "
            f"{r['best_mean']:.4f} ± {r['best_sd']:.4f} | {diff} | {_p(r['p_value'])} | {_p(r['p_holm'])}{survives} | "
            f"{r['trainable_params']:,} | {r['frozen_params']:,} | {flops} | {r['ms_per_step']:.1f} |"
        )
    lines += ["", f"Accuracies: mean ± sd over seeds. The paired column pairs each variant's seed with the "
              "baseline's (the seeds both have; '(n pairs)' where fewer than the variant's seeds; no interval "
              f"from one pair); p is the paired t-test's, Holm p that p corrected for the {compared} variants compared "
              "(* = below 0.05 after correction)."]  # fmt: skip
    tested = [r for r in rows if "test_mean" in r]
    if tested:
        test_metric, compared_t = tested[0]["test_metric"], sum(math.isfinite(r["test_p_value"]) for r in tested)
        lines += ["", f"Test split, each run's last weights (no selection on test): {test_metric}", "",
                  f"| variant | seeds | {test_metric} | vs {baseline_name} (paired mean [95 % CI]) | p | Holm p ({compared_t}) |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in tested:
            diff = "-" if r["baseline"] is None else (
                _interval(r["test_diff_mean"], r["test_diff_low"], r["test_diff_high"], ".4f") + _pairs(r["test_pairs"], r["test_seeds"]))
            survives = "*" if r["test_p_holm"] < 0.05 else ""
            lines.append(f"| {r['variant']} | {r['test_seeds']} | {r['test_mean']:.4f} ± {r['test_sd']:.4f} | {diff} | "
                         f"{_p(r['test_p_value'])} | {_p(r['test_p_holm'])}{survives} |")  # fmt: skip
    if left_out:
        shown = [entry.replace(" (missing)", " (missing: pending, no result.json yet)") for entry in left_out]
        lines += ["", f"Runs not in the table ({len(left_out)}): " + "; ".join(shown) + "."]
    summarised = [name for name in COHERENCE_SUMMARY if any(f"{name}_mean" in r for r in rows)]
    if summarised:
        lines += ["", "Gradient coherence over training (GCR's mechanism): each run's mean over its recorded steps "
                  "after step 0, then mean ± sd over seeds, and the paired difference to the baseline [95 % CI]:", "",
                  "| variant | " + " | ".join(f"{n} (seeds) | vs {baseline_name}" for n in summarised) + " |",
                  "|---|" + "---:|---:|" * len(summarised)]  # fmt: skip
        for r in rows:
            cells = []
            for n in summarised:
                if f"{n}_mean" not in r:
                    cells += ["-", "-"]
                    continue
                cells.append(f"{r[f'{n}_mean']:.4g} ± {r[f'{n}_sd']:.2g} ({r[f'{n}_seeds']})")
                cells.append(_interval(r[f"{n}_diff_mean"], r[f"{n}_diff_low"], r[f"{n}_diff_high"], ".3g"))
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    coherence = [c for c in columns if "@" in c]
    if coherence:
        lines += ["", "Gradient coherence (mean over seeds) at training steps:", "",
                  "| variant | " + " | ".join(coherence) + " |", "|---|" + "---:|" * len(coherence)]  # fmt: skip
        lines += [f"| {r['variant']} | " + " | ".join(_csv(r.get(c)) for c in coherence) + " |" for r in rows]
    splits = {json.dumps(r.get("data_split", {}), sort_keys=True) for r in results}
    footer = f"Data split of every run: {', '.join(sorted(splits))}."
    if any(math.isfinite(r["setup_s"]) for r in rows):
        footer += " Set-up before the first step, per run: " + ", ".join(
            f"{r['variant']} {r['setup_s']:.1f} s" for r in rows if math.isfinite(r["setup_s"])
        ) + "."  # fmt: skip
    timed = [r["run_seconds"] for r in results if isinstance(r.get("run_seconds"), (int, float))]
    if timed:
        footer += (f" Wall time of the {len(timed)} finished runs' set-up, training and validation (run_seconds, summed; "
                   "the test scoring not included): "
                   f"{sum(timed) / 60:.1f} min.")  # fmt: skip
    lines += ["", footer]
    (into / "results.md").write_text("\n".join(lines) + "\n")
    _plot(results, rows, order, metric, into / "results.png")
    _plot_accuracy(results, rows, metric, into / "accuracy.png")
    _plot_coherence(results, rows, into / "coherence.png")
    print("\n".join(lines) + f"\n\nWrote {into}/results.csv, results.md, results.png, accuracy.png and coherence.png")
    return into


REPORT_FILES = ("results.md", "results.csv", "results.png", "accuracy.png", "coherence.png")


def write_report_index(docs: Path, subfolder: str, names: Sequence[str]) -> Path:
    """`docs/<subfolder>/results.txt`: for each sweep `name` whose report is in `docs/<subfolder>/<name>/`
    ([`write_report`][frozenlm.sweep.write_report] `into`), a section that includes its `results.md` (pymdownx.snippets) and shows
    its plots; a line saying which have no report yet. A docs page includes this one file, which always
    exists once written, so the page names only files that exist (`check_paths`). Not a `.md`: it is
    no page of its own; its links are relative to `docs`, where the including page is."""
    folder = Path(docs) / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    lines, waiting = [], []
    for name in names:
        if not (folder / name / "results.md").is_file():
            waiting.append(f"`{name}`")
            continue
        lines += [f"### `{name}`", "", f'--8<-- "{subfolder}/{name}/results.md"', ""]
        lines += [f"![{name}: {plot.removesuffix('.png')}]({subfolder}/{name}/{plot})" for plot in REPORT_FILES[3:]
                  if (folder / name / plot).is_file()]  # fmt: skip
        lines += ["", f"Every run's numbers: [`{subfolder}/{name}/results.csv`]({subfolder}/{name}/results.csv).", ""]
    if waiting:
        lines += [f"No finished run yet, so no report: {', '.join(waiting)}.", ""]
    path = folder / "results.txt"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _interval(mean: float, low: float, high: float, spec: str) -> str:
    """`mean [low, high]`; `mean (no interval)` from one pair; `-` without any."""
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(low):
        return f"{mean:+{spec}} (no interval)"
    return f"{mean:+{spec}} [{low:+{spec}}, {high:+{spec}}]"


def _pairs(pairs: int, seeds: int) -> str:
    return f" ({pairs} pairs)" if pairs < seeds else ""


def _p(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.3f}" if value >= 0.001 else "<0.001"


def _csv(value: Any) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def _plot(results: list[dict[str, Any]], rows: list[dict[str, Any]], order: list[str], metric: str, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.4 * len(rows) + 2, 3.5))
    ax = figure.subplots()
    names = [r["variant"] for r in rows]
    ax.errorbar(range(len(rows)), [r["final_mean"] for r in rows], yerr=[r["final_sd"] for r in rows],
                fmt="o", capsize=6, color="black", label="mean ± sd over seeds")  # fmt: skip
    for result in results:
        x = names.index(result["variant"]) + 0.12
        ax.plot(x, result["final"], ".", color="tab:blue", alpha=0.6)
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel(f"final {metric}")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _plot_accuracy(results: list[dict[str, Any]], rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Left: each variant's test metric (the validation metric where the runs have no test split), one point
    per seed and the mean; right: the paired difference to the baseline with its 95 % t interval."""
    from matplotlib.figure import Figure

    test = any("test_mean" in r for r in rows)
    name = next((r["test_metric"] for r in rows if "test_mean" in r), None) if test else f"final {metric}"
    prefix = "test_" if test else ""
    figure = Figure(figsize=(min(14.0, 1.3 * len(rows) + 3), 4.2))
    left, right = figure.subplots(1, 2)
    names = [r["variant"] for r in rows]
    for result in results:
        value = (result.get("test") or {}).get(name) if test else result["final"]
        if value is not None and result["variant"] in names:
            left.plot(names.index(result["variant"]), value, ".", color="tab:blue", alpha=0.6)
    means = [(i, r["test_mean"] if test else r["final_mean"]) for i, r in enumerate(rows) if not test or "test_mean" in r]
    left.plot([i for i, _ in means], [m for _, m in means], "_", color="black", markersize=16, label="mean over seeds")
    left.set_xticks(range(len(rows)), names, rotation=45, ha="right")
    left.set_ylabel(name)
    left.set_title("each seed (points) and the mean", fontsize=9)
    left.legend(fontsize=8)
    compared = [(i, r) for i, r in enumerate(rows)
                if r["baseline"] is not None and math.isfinite(r.get(f"{prefix}diff_mean", math.nan))]
    for i, r in compared:
        low, high = r[f"{prefix}diff_low"], r[f"{prefix}diff_high"]
        mean = r[f"{prefix}diff_mean"]
        if math.isfinite(low):
            right.errorbar(i, mean, yerr=[[mean - low], [high - mean]], fmt="o", capsize=6, color="black")
        else:  # one pair: no interval
            right.plot(i, mean, "o", color="gray")
    right.axhline(0.0, color="tab:red", linewidth=0.8)
    right.set_xticks(range(len(rows)), names, rotation=45, ha="right")
    right.set_ylabel(f"{name}: paired difference")
    right.set_title("paired difference to the baseline, 95 % t interval", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _plot_coherence(results: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """Gradient coherence at each recorded step, mean over seeds, one line per variant (one panel per
    measure); a figure saying so when no run recorded any."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.8), layout="constrained")
    axes = figure.subplots(1, len(COHERENCE_SUMMARY))
    for ax, name in zip(axes, COHERENCE_SUMMARY):
        drawn = False
        for r in rows:
            steps: dict[int, list[float]] = {}
            for result in results:
                if result["variant"] != r["variant"]:
                    continue
                for step, values in (result.get("coherence") or {}).items():
                    measured = [v for k, v in values.items() if k.endswith(f"/{name}") and v is not None]
                    steps.setdefault(int(step), []).extend(measured)
            points = sorted((step, statistics.mean(values)) for step, values in steps.items() if values)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], "o-", markersize=3, label=r["variant"])
                drawn = True
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{name} (mean over seeds)")
        if not drawn:
            ax.text(0.5, 0.5, "no coherence recorded", ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, fontsize=7, loc="outside right center")
    figure.savefig(path, dpi=120)


if __name__ == "__main__":  # one run of a sweep, in its own process (see `gpus`)
    preset_path, output_dir, variant_name, seed_value = sys.argv[1:5]
    run_recorded(load_preset(preset_path), variant_name, int(seed_value), Path(output_dir))
