"""The `fusedlis` command: generate, bench, info, tune, predict, calibrate."""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, function that adds the subparser); a module that fails to import is reported, not fatal.
_COMMANDS = [
    ("generate", "fusedlis.cli_generate", "add_parser"),
    ("bench", "fusedlis.cli_bench", "add_parser"),
    ("info", "fusedlis.cli_info", "add_parser"),
    ("tune", "fusedlis.tuning.cli", "add_parser"),
    ("predict", "fusedlis.perfmodel.cli", "add_predict_parser"),
    ("calibrate", "fusedlis.perfmodel.cli", "add_calibrate_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedlis",
        description="Fast tensor-parallel LLM decode on Triton kernels, fusing compute with communication.")
    from fusedlis import __version__

    parser.add_argument("--version", action="version", version=f"fusedlis {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod, fn in _COMMANDS:
        try:
            getattr(importlib.import_module(mod), fn)(sub)
        except (ImportError, AttributeError) as e:  # a missing optional part must not break the others
            p = sub.add_parser(name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e: _unavailable(e))
    return parser


def _unavailable(e: Exception) -> int:
    print(f"fusedlis: this command is unavailable here: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `fusedlis predict ... | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"fusedlis {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
