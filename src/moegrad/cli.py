"""The ``moegrad`` command line: ``moegrad <command> --help`` explains each command."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help); each module defines add_arguments(parser) and run(args)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("moegrad.bench.cli", "time moegrad.MoE per expert backend vs the dense ideal and HF Mixtral"),
    "study": ("moegrad.study.cli", "train small MoE models with each estimator and report which to use"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moegrad",
        description="moegrad: trainable, fast and measurable top-k routing for Mixture-of-Experts.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
