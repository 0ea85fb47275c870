"""`python -m experiments COMMAND ...`: the experiment suite's single entry point.

Commands:
  reproduce  the main job: the paper's claims end to end (configs/digits.yaml is the default)
  sweep      a hyperparameter grid as one compiled, vmapped, sharded program
  bench      benchmarks (the DELM step, the peer comparison with torchdeq)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "reproduce": "experiments.reproduce.cli",
    "sweep": "experiments.sweep.cli",
    "bench": "experiments.bench.cli",
}


USAGE = f"usage: python -m experiments {{{','.join(COMMANDS)}}} [options]; python -m experiments --help lists them"


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command's `main`. No command or an unknown one: one line on stderr, exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv:
        print(f"python -m experiments: error: no command given; {USAGE}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m experiments: error: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
