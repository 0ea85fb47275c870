"""`python -m experiments COMMAND ...`: the experiment suite's single entry point.

Commands:
  reproduce  the main job: the paper's claims end to end (configs/digits.yaml is the default)
  sweep      a hyperparameter grid as one compiled, vmapped, sharded program
  bench      benchmarks (the DELM step, the peer comparison with torchdeq)

`python -m experiments COMMAND --help` describes each. Exit statuses, the same for every command: 0 done, 1 done but
a check failed, 2 a usage, configuration, data or output error (one line on stderr; previous results kept), 130
interrupted.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

# before numpy/jaxlib load OpenBLAS: one thread is faster next to XLA's threads on small CPUs, and results (hence
# checkpoint reuse) then do not depend on how the caller's shell set it; an explicit setting wins
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

PROG = "python -m experiments"
COMMANDS = {
    "reproduce": "experiments.reproduce.cli",
    "sweep": "experiments.sweep.cli",
    "bench": "experiments.bench.cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        if not argv:
            problem = "a command is required"
        else:
            close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
            problem = f"unknown command {argv[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        print(f"{PROG}: error: {problem}; commands: {', '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
