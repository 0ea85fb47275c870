"""The applications' one way to run a command: a user error is one line and exit status 2, never a traceback.

Exit statuses, the same for every subcommand of `python -m experiments`:

| status | meaning |
|---|---|
| 0 | done, and everything checked passed |
| 1 | done, but something checked failed (a claim, a benchmark goal) |
| 2 | not run, or stopped without replacing any result: an error the user can fix (one line on stderr names it) |
| 130 | interrupted (Ctrl-C or SIGTERM); what was finished is kept, the same command resumes |

Exit status 2 covers usage, configuration, data and output errors: a flag or key, a missing data set, a folder another
run holds, a file that cannot be written (`experiments.common.io.WriteError`), a corrupt checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from experiments.common import interrupts

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Something the user can fix (a config key, a path, a missing data file): reported as one line, exit 2.

    The message should name what is wrong in the user's terms (the flag or config key, not a function argument)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a `UserError` (one line naming the flag, exit status 2, with a pointer to
    --help) instead of argparse's usage block plus message."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """`parser.parse_args`, returning argparse's exit status (0 for --help, 2 for a usage error) instead of exiting
    (with `ArgumentParser` a usage error is a `UserError` instead, for `run` to report in one line)."""
    try:
        return parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)


def run(prog: str, body: Callable[[], int | None], *, interrupted: str | Callable[[], str] | None = None) -> int:
    """Run `body()` and turn its outcome into an exit status (see the table above).

    `UserError` (and its subclasses, e.g. `ConfigError`) prints `prog: error: <message>` on one line;
    `KeyboardInterrupt` (Ctrl-C, or SIGTERM, which is turned into one; never lost, see
    `experiments.common.interrupts`) prints `prog: interrupted` and the `interrupted` hint (e.g. how to resume).
    Any other exception is a bug and propagates with its traceback."""
    with interrupts.handled():
        try:
            return int(body() or 0)
        except UserError as err:
            message = " ".join(str(err).split())  # one line, whatever the message's author wrote
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        except KeyboardInterrupt:
            hint = interrupted() if callable(interrupted) else interrupted
            print(f"\n{prog}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
