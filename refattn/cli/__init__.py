"""The ``refattn`` command line.

One module per command group, each a pair of functions per subcommand:
``add_<name>(subparsers)`` declares its arguments and ``cmd_<name>(args) -> int`` parses
nothing more, calls the library and prints. `COMMANDS` lists them. Exit status: 0
success, 1 a refattn error (bad input: one line ``refattn NAME: error: ...`` on stderr),
2 a usage error (argparse).
"""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from ..errors import RefattnError
from ._common import checksum
from .bench import add_bench, cmd_bench
from .checkpoint import add_checkpoint, cmd_checkpoint
from .golden import add_golden, cmd_golden
from .run import add_run, cmd_run
from .show import add_patterns, add_show, cmd_patterns, cmd_show
from .study import add_explain, add_paths, cmd_explain, cmd_paths
from .verify import add_verify, cmd_verify

COMMANDS = [("run", add_run, cmd_run), ("patterns", add_patterns, cmd_patterns),
            ("show", add_show, cmd_show), ("paths", add_paths, cmd_paths), ("explain", add_explain, cmd_explain),
            ("golden", add_golden, cmd_golden),
            ("verify", add_verify, cmd_verify), ("checkpoint", add_checkpoint, cmd_checkpoint),
            ("bench", add_bench, cmd_bench)]

__all__ = ["COMMANDS", "build_parser", "checksum", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refattn",
        description="refattn: the reference engine and specification for attention.",
    )
    parser.add_argument("--version", action="version", version=f"refattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, add, run in COMMANDS:
        add(sub)
        sub.choices[name].set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except RefattnError as e:
        print(f"refattn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`refattn patterns | head`): stop quietly, as other CLIs do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # an output that cannot be written (a full disk, /dev/full, an unwritable --json): one line;
        # what stdout still buffers goes nowhere, so that exiting adds no second error
        where = f": {e.filename}" if e.filename else ""
        print(f"refattn {args.command}: error: cannot write{where}: {e.strerror or e}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MemoryError as e:
        # the last resort: sizes refattn can foresee are refused before they are allocated
        print(f"refattn {args.command}: error: out of memory: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
