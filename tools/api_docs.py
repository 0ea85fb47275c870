"""Build the API reference from the docstrings with pdoc, and fail on any warning pdoc gives.

    python tools/api_docs.py [OUTPUT_DIR]        # default docs/api (git-ignored); what `make docs` runs

Documents `deq_jax` and its public submodules (`deq_jax.theory`; `_`-prefixed modules are private and skipped).
pdoc reports what it cannot render (a module that fails to import, an annotation it cannot resolve, an object
whose docstring or signature it cannot read) as Python warnings and carries on; here every such warning is
printed and the build exits with status 1, so a broken reference fails CI instead of rendering as a blank.
Pages are self-contained HTML (no MathJax or other CDN scripts), readable offline.
"""

import importlib
import pathlib
import shutil
import sys
import warnings

import pdoc
import pdoc.doc
import pdoc.render

ROOT = pathlib.Path(__file__).resolve().parents[1]
# deq_jax and its public submodules; a module with a `_`-prefixed part in its name is private and not documented
SPECS = ["deq_jax", r"!deq_jax\.(.*\.)?_"]
# pages that must exist and list names: pdoc documents a package's re-exports (and its submodules) only when the
# package's `__all__` lists them, so a missing or partial `__all__` shows here instead of as an empty page
REQUIRED = ["deq_jax", "deq_jax.theory"]


def _namedtuple_annotations_resolvable(package: str) -> None:
    """Let pdoc resolve the field annotations of `typing.NamedTuple` classes in modules with postponed annotations.

    A NamedTuple's generated `__new__` claims a module `namedtuple_<Name>` that does not exist, so pdoc evaluates
    its string annotations in an empty namespace and warns; pointed at the class's own module they resolve. The
    build changes only its own in-process copy of the classes.
    """
    importlib.import_module(package)
    for name, module in list(sys.modules.items()):
        if name != package and not name.startswith(package + "."):
            continue
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
                new = obj.__new__
                if getattr(new, "__module__", "").startswith("namedtuple_"):
                    new.__module__ = obj.__module__


def main(argv: list[str]) -> int:
    """Build the pages into `argv[1]` (default docs/api); return the exit status (1 if pdoc warned)."""
    output = pathlib.Path(argv[1] if len(argv) > 1 else ROOT / "docs" / "api")
    sys.path.insert(0, str(ROOT))  # document this checkout, whichever copy of deq_jax is installed
    shutil.rmtree(output, ignore_errors=True)  # no stale pages of modules that were renamed or removed
    pdoc.render.configure(docformat="google", show_source=False, footer_text="deq_jax API reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # jaxopt 0.8.5 is the final release and warns on import (the library filters it the same way)
        warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
        _namedtuple_annotations_resolvable("deq_jax")
        pdoc.pdoc(*SPECS, output_directory=output)
        problems = [f"{warning.category.__name__}: {warning.message}" for warning in caught]
        for name in REQUIRED:
            documented = [member for member in pdoc.doc.Module.from_name(name).members if not member.startswith("__")]
            if not (output / f"{name.replace('.', '/')}.html").exists():
                problems.append(f"no page for {name}: is it listed in its parent package's __all__?")
            elif not documented:
                problems.append(f"the page of {name} documents no names: list its public names in its __all__")
    for problem in problems:
        print(f"api docs: {problem}", file=sys.stderr)
    pages = sorted(str(path.relative_to(output)) for path in output.rglob("*.html") if path.name != "index.html")
    if problems:
        print(
            f"api docs: FAILED, {len(problems)} problem(s) above ({len(pages)} pages written to {output})",
            file=sys.stderr,
        )
        return 1
    print(f"api docs: {len(pages)} pages in {output}: {', '.join(pages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
