"""Mutation testing of the modules listed in pyproject.toml's [tool.mutmut] only_mutate, with a sampled set of mutants.

    python tools/mutation.py [--sample N] [--seed S] [--jobs J]

Generates every mutant (mutmut 3), draws N of them (all with --sample 0) with a fixed seed, and runs those: mutmut
records which tests reach each mutated function and runs only those tests per mutant. JAX compiles on every fresh
worker, so a mutant costs seconds: the default sample (150) fits about 30 minutes on 2 cores. Prints the score and
the survivors; `mutmut show NAME` prints a survivor's diff. Results stay in mutants/ (ignored by git).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path


def all_mutant_names() -> list[str]:
    """Generate the mutants (into mutants/) and list their names, without running any test."""
    from mutmut import __main__ as mm

    mm.set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    mm.copy_src_dir()
    mm.copy_also_copy_files()
    mm.setup_source_paths()
    mm.store_lines_covered_by_tests()
    mm.create_mutants(1)
    names = []
    for path in mm.walk_mutatable_files():
        data = mm.SourceFileMutationData(path=path)
        data.load()
        names += list(data.exit_code_by_key)
    return sorted(names)


def results() -> dict[str, str]:
    from mutmut import __main__ as mm

    status = {}
    for path in mm.walk_mutatable_files():
        data = mm.SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            status[name] = mm.status_by_exit_code.get(code, "not checked") if code is not None else "not checked"
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=150, help="mutants to run (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    names = all_mutant_names()
    chosen = (
        names
        if args.sample <= 0 or args.sample >= len(names)
        else sorted(random.Random(args.seed).sample(names, args.sample))
    )
    print(f"{len(names)} mutants generated; running {len(chosen)} (seed {args.seed})", flush=True)
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs), *chosen], check=False)
    status = results()
    ran = {name: status.get(name, "not checked") for name in chosen}
    killed = sum(s in ("killed", "timeout", "segfault", "caught by type check") for s in ran.values())
    survivors = sorted(name for name, s in ran.items() if s in ("survived", "no tests"))
    print(f"\nscore: {killed} / {len(ran)} killed ({100 * killed / max(len(ran), 1):.1f}%)")
    for name, s in sorted(ran.items()):
        if s not in ("killed",):
            print(f"  {s:12s} {name}")
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
