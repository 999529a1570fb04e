"""`longtune` command line: one subcommand per job, all sharing the config loader.

Every subcommand takes ``--config FILE``, ``--print-config`` and dotted overrides
(``train.max_steps=50``). A few common settings also have flags of their own; a flag is
only a spelling of an override, so the config stays the single source of truth.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from longtune.config import Config, ConfigError, load_config
from longtune.errors import LongtuneError, one_line
from longtune.plan import GPUS as PLAN_GPUS
from longtune.runtime import LOG_LEVEL_ENV, quiet_libraries


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
"""A dotted config override word: section.key=value."""


class NotImplementedYet(RuntimeError):
    """A job whose issue is still open; the CLI exits 2 and says so."""


@dataclass(frozen=True)
class Flag:
    name: str
    key: str
    help: str
    type: Callable[[str], object] = str
    nargs: str | None = None


@dataclass(frozen=True)
class Option:
    """A command's own argument that is not a config setting (``plan --gpu``): passed to the
    command's function as the keyword ``dest``."""

    name: str
    dest: str
    help: str
    flag: bool = False  # a switch (store_true) rather than a value


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    issue: int  # the issue that delivers it, named while it is still open
    run: str | None = None  # "module:function", imported only when run (keeps --help fast)
    flags: tuple[Flag, ...] = field(default_factory=tuple)
    options: tuple[Option, ...] = field(default_factory=tuple)


COMMANDS: tuple[Command, ...] = (
    Command(
        "prepare",
        "tokenize and pack a corpus into context-length blocks (parquet + manifest)",
        4,
        run="longtune.data.pipeline:prepare_command",
        flags=(
            Flag("--source", "data.sources", "path, glob or URI of documents", nargs="+"),
            Flag("--tokenizer", "data.tokenizer", "tokenizer name or path"),
            Flag("--context-length", "data.context_length", "block length in tokens", int),
            Flag("--out", "data.prepared_path", "where to write the prepared dataset"),
        ),
    ),
    Command(
        "finetune",
        "extend a model's context with LongLoRA / LoRA² on Ray Train",
        5,
        "longtune.finetune:finetune_command",
    ),
    Command(
        "evaluate",
        "perplexity by context length and passkey retrieval, full attention",
        6,
        run="longtune.eval.report:evaluate_command",
        flags=(
            Flag("--model", "model.name_or_path", "base model (hub id or path)"),
            Flag("--adapter", "model.adapter_path", "adapter directory to apply"),
            Flag("--lengths", "eval.lengths", "context lengths to score", int, "+"),
        ),
    ),
    Command(
        "replicate",
        "LongLoRA's comparison in miniature: base, interpolation, LoRA/LoRA+ with S2 or full attention",
        6,
        run="longtune.replicate:replicate_command",
    ),
    Command(
        "tune",
        "Ray Tune search over group size, rank, adapter type and learning rate",
        8,
        run="longtune.tune:tune_command",
    ),
    Command(
        "export",
        "merge an adapter into its base model and save a plain Hugging Face model",
        6,
        run="longtune.export:export_command",
        flags=(
            Flag("--model", "model.name_or_path", "base model (hub id or path)"),
            Flag("--adapter", "model.adapter_path", "adapter directory to merge"),
            Flag("--out", "export.output_dir", "where to write the merged model"),
        ),
    ),
    Command(
        "plan",
        "predict a run's peak GPU memory (broken down), whether it fits, its longest context and FLOPs",
        15,
        run="longtune.plan:plan_command",
        options=(
            Option("--gpu", "gpu", "the GPU each worker gets: " + ", ".join(PLAN_GPUS)),
            Option("--json", "as_json", "print one JSON object instead of the table", flag=True),
        ),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longtune",
        description="Fine-tune language models to far longer context windows "
        "(LongLoRA S2-Attn + LoRA+, LoRA²) on Ray, tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        add_command_arguments(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help), cmd)
    return parser


def add_command_arguments(parser: argparse.ArgumentParser, cmd: Command) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (defaults otherwise)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--verbose", action="store_true",
        help="also show what Ray, Ray Train, Ray Data, transformers and MLflow print at INFO, "
        "their progress bars and Ray's notices (as LONGTUNE_LOG_LEVEL=info does)",
    )
    for flag in cmd.flags:
        parser.add_argument(
            flag.name, dest=flag.key, type=flag.type, nargs=flag.nargs, help=f"{flag.help} ({flag.key})"
        )
    for option in cmd.options:
        if option.flag:
            parser.add_argument(option.name, dest=option.dest, action="store_true", help=option.help)
        else:
            parser.add_argument(option.name, dest=option.dest, help=option.help)
    # Overrides are collected from the leftover arguments (see main): a `nargs="*"`
    # positional beside `nargs="+"` flags makes argparse misread `--source a b x=1`.
    parser.usage = "%(prog)s [options] [KEY=VALUE ...]"
    parser.epilog = "KEY=VALUE: dotted config overrides, e.g. train.max_steps=50 adapter.rank=16"


def resolve_config(args: argparse.Namespace, cmd: Command) -> Config:
    overrides = list(args.overrides)
    for flag in cmd.flags:
        value = getattr(args, flag.key)
        if value is not None:
            text = "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else value
            overrides.append(f"{flag.key}={text}")
    return load_config(args.config, overrides)


def run_command(cmd: Command, config: Config, options: dict[str, object] | None = None) -> int:
    import importlib

    if cmd.run is None:
        raise NotImplementedYet(
            f"longtune {cmd.name}: not implemented yet (issue #{cmd.issue} is open)"
        )
    module_name, _, func_name = cmd.run.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(config, **(options or {})) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Overrides are taken out before argparse runs: a flag with several values (--lengths,
    # --source) would otherwise swallow the `section.key=value` words that follow it.
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args, extra = parser.parse_known_args([a for a in argv if not OVERRIDE.match(a)])
    cmd = next(c for c in COMMANDS if c.name == args.command)
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like KEY=VALUE)")
    args.overrides = overrides + extra  # undotted KEY=VALUE words reach the config's own error
    if args.verbose:
        os.environ[LOG_LEVEL_ENV] = "info"
    quiet_libraries()  # before the job imports them: longtune's lines and real warnings only

    def resolve_and_run() -> int:
        config = resolve_config(args, cmd)
        if args.print_config:
            sys.stdout.write(config.to_yaml())
            return 0
        return run_command(cmd, config, {o.dest: getattr(args, o.dest) for o in cmd.options})

    return _exit_code(cmd, resolve_and_run)


def run_job(name: str, config: Config) -> int:
    """Run the job ``name`` on ``config`` as the command line does: its exit code, and one
    line on stderr for an error the user can fix."""
    cmd = next(c for c in COMMANDS if c.name == name)
    return _exit_code(cmd, lambda: run_command(cmd, config))


def _exit_code(cmd: Command, body: Callable[[], int]) -> int:
    """``body()``'s exit code; every error a user can fix is caught here, once: one line on
    stderr and exit 2 (a config error, an unfinished command) or 1 (any other LongtuneError:
    data, model, training, evaluation, export, search)."""
    try:
        return body()
    except ConfigError as err:
        print(f"longtune {cmd.name}: config error: {one_line(err)}", file=sys.stderr)
        return 2
    except LongtuneError as err:
        print(f"longtune {cmd.name}: {one_line(err)}", file=sys.stderr)
        return 1
    except NotImplementedYet as err:
        print(str(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longtune {cmd.name}: interrupted", file=sys.stderr)
        return 130


def job_main(name: str) -> None:
    """Entry point of pipelines/<name>.py: ``longtune <name>`` with the script's arguments."""
    sys.exit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
