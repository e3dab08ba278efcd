"""Command line of the golf package: `python -m golf <command> ...`; `python -m golf --help` lists them.

Each command is a module with `main(argv: list[str]) -> int` that parses its own arguments, registered
in COMMANDS with one line of help. Only the chosen command's module is imported, so a command's
heavy imports (torch, plotting) cost nothing to the others.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name -> (module with main(argv), one line of help)
    "records": ("golf.records", "create, check, rank, reproduce and compare record folders"),
    "study": ("golf.study", "run ablation studies from a TOML file (run), and report on them with statistics (report)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [__doc__.splitlines()[0], "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "python -m golf COMMAND --help describes one"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"python -m golf: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
