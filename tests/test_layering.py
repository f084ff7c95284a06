"""The package's layering, read from the source with ``ast`` (no imports executed).

Layers, bottom up: ``vocab`` and ``errors`` (import nothing of ours); the measurement
packages ``photometry/``, ``detect/``, ``lightcurves/`` (never the catalogue, the
simulator, the cluster code or the stages); ``catalog/`` (never the cluster code, the
stages or the simulator); the simulator, used only by the command line, the truth
comparison (``evaluate.py``) and the run report. Function-local imports count: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = "survey_proc"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every ``survey_proc`` module a file imports (absolute names; ``from pkg import x`` gives both)."""
    mod = _module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # "from survey_proc import simulate"
    return {n for n in out if n == PACKAGE or n.startswith(PACKAGE + ".")}


MODULES = {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(importers: list[str], forbidden: list[str]) -> list[str]:
    return sorted(f"{mod} imports {dep}" for mod, deps in MODULES.items()
                  if any(_under(mod, p) for p in importers)
                  for dep in deps if any(_under(dep, f) for f in forbidden))


def test_every_module_was_parsed():
    assert len(MODULES) > 30
    for name in ("survey_proc.vocab", "survey_proc.errors", "survey_proc.store", "survey_proc.photometry.aperture",
                 "survey_proc.catalog.crossmatch", "survey_proc.simulate.survey"):
        assert name in MODULES


@pytest.mark.parametrize("module", ["survey_proc.vocab", "survey_proc.errors"])
def test_bottom_layer_imports_nothing_of_ours(module):
    assert MODULES[module] == set(), f"{module} must import nothing of survey_proc: {sorted(MODULES[module])}"


def test_measurement_packages_stay_below_catalog_simulator_cluster_and_stages():
    bad = _violations(["survey_proc.photometry", "survey_proc.detect", "survey_proc.lightcurves"],
                      ["survey_proc.catalog", "survey_proc.simulate", "survey_proc.distributed", "survey_proc.stages"])
    assert bad == []


def test_catalog_stays_below_cluster_stages_and_simulator():
    bad = _violations(["survey_proc.catalog"],
                      ["survey_proc.distributed", "survey_proc.stages", "survey_proc.simulate"])
    assert bad == []


def test_only_cli_evaluate_and_report_use_the_simulator():
    allowed = {"survey_proc.cli", "survey_proc.evaluate", "survey_proc.report"}
    bad = sorted(f"{mod} imports {dep}" for mod, deps in MODULES.items()
                 if mod not in allowed and not _under(mod, "survey_proc.simulate")
                 for dep in deps if _under(dep, "survey_proc.simulate"))
    assert bad == []


def test_relative_imports_resolve(tmp_path):
    """The import reader resolves ``from . import x`` and ``from ..y import z`` as Python does."""
    root = tmp_path / PACKAGE
    (root / "catalog").mkdir(parents=True)
    f = root / "catalog" / "mod.py"
    f.write_text("from . import schema\nfrom ..vocab import MASK_BAD\nimport numpy\n"
                 "def lazy():\n    from survey_proc.simulate import survey\n")
    assert _imports(f, root) == {"survey_proc.catalog", "survey_proc.catalog.schema", "survey_proc.vocab",
                                 "survey_proc.vocab.MASK_BAD", "survey_proc.simulate",
                                 "survey_proc.simulate.survey"}


def test_config_docstring_names_every_section():
    """``survey_proc.config``'s module docstring lists every ``[section]`` of :class:`RunConfig`."""
    from survey_proc import config

    sections = [f.name for f in dataclasses.fields(config.RunConfig)
                if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())]
    assert sorted(sections) == sorted(config.SECTIONS)
    doc = config.__doc__ or ""
    missing = [s for s in sections if f"[{s}]" not in doc]
    assert missing == [], f"config.py's docstring does not name the section(s) {missing}"
