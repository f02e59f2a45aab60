"""The ``moegrad`` command line: ``moegrad <command> --help`` explains each command.

Only the command that runs is imported: ``moegrad --help`` (and a bad command) load no torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterable, Optional

#: subcommand -> (module, one-line help); each module defines add_arguments(parser) and run(args)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("moegrad.bench.cli", "time moegrad.MoE per expert backend vs the dense ideal and HF Mixtral"),
    "study": ("moegrad.study.cli", "train small MoE models with each estimator and report which to use"),
}


def build_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The parser; ``commands``: the subcommands whose module is imported to add its arguments
    (default all; the others are listed with their help line only and take no arguments)."""
    loaded = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="moegrad",
        description="moegrad: trainable, fast and measurable top-k routing for Mixture-of-Experts.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name not in loaded:
            sub.add_parser(name, help=help_text)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the first word not an option names the command: only its module is imported
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command] if command in COMMANDS else [])
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
