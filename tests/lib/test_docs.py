"""Every Python block of the README and of docs/ runs as written, as a user runs it.

Each document's blocks run in order in one fresh interpreter (x64 off, JAX's default, unless a block turns it on),
each block in its own namespace: a block may not lean on names another block defined. A block fails the test when
it raises, or when it warns that training diverged or that a solve missed its tolerance: a documented example must
converge. Shell blocks (make targets, CLI runs) are exercised by the application tests instead.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCUMENTS = ["README.md", "docs/theory.md", "docs/benchmarks.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

RUNNER = r"""
import json, sys, traceback, warnings
blocks = json.load(open(sys.argv[1]))
warnings.simplefilter("always")
for index, (line, code) in enumerate(blocks):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exec(compile(code, f"{sys.argv[2]}:block {index + 1} (line {line})", "exec"), {"__name__": "__main__"})
        except Exception:
            print(f"FAILED {sys.argv[2]} block {index + 1} (line {line})", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
    loud = [w for w in caught if type(w.message).__name__ in ("DivergenceWarning", "NonConvergenceWarning")]
    if loud:
        print(f"FAILED {sys.argv[2]} block {index + 1} (line {line}) warned: {loud[0].message}", file=sys.stderr)
        sys.exit(1)
    print(f"ok block {index + 1} (line {line})")
"""


def blocks(document: str) -> list:
    text = (ROOT / document).read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_the_readme_has_a_runnable_quick_start():
    found = blocks("README.md")
    assert found, "README.md has no python block"
    assert any("deq_jax.solve" in code and "full_batch_gd" in code for _, code in found)


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if blocks(d)])
def test_python_blocks_run_as_written(document, tmp_path):
    found = blocks(document)
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(found))
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)  # as a user runs it: x64 off unless the block turns it on
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(spec), document],
        cwd=tmp_path,
        env=env,
        check=False,  # the exit status is asserted below, with the block's output
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("ok block") == len(found)
    assert "nan" not in out.stdout.lower().replace("nonfinite", ""), out.stdout[-2000:]
