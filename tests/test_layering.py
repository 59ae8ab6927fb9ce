"""The packages of liftft form layers, and every import runs down them: a package imports only itself and the
packages of lower layers, so a change to one idea touches one package (docs/layout.md)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

import liftft

SOURCE = Path(liftft.__file__).parent
# Bottom to top. Packages of one layer are siblings: neither imports the other.
LAYERS = (
    ("utils",),
    ("data",),
    ("engine",),
    ("deltas",),
    ("eval",),
    ("planning",),
    ("training",),
    ("demo",),
    ("analysis", "lm_eval_tasks", "reproduce"),
    ("commands",),
    ("<top>",),  # liftft/__init__.py, cli.py, __main__.py, and the documented liftft.evaluate alias
)
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def package_of(module: str, root: Path) -> str:
    """The layer package of dotted ``module`` (``liftft.engine.optim`` → ``engine``): ``<top>`` for the root
    package and its top-level modules."""
    parts = module.split(".")
    if len(parts) < 2 or not (root / parts[1]).is_dir():
        return "<top>"
    return parts[1]


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted liftft module) of every import in the file at ``path``, inside functions too."""
    own = ".".join(("liftft", *path.relative_to(root).with_suffix("").parts))
    package = own.rsplit(".", 1)[0] if path.name != "__init__.py" else own.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from liftft import training` imports the package training, `from liftft import LiftAdamW` the root
            found += [(node.lineno, f"{base}.{alias.name}" if base == "liftft" and (root / alias.name).is_dir()
                       else base) for alias in node.names]
    return [(line, name) for line, name in found if name == "liftft" or name.startswith("liftft.")]


def upward_imports(root: Path) -> list[str]:
    """Every import under ``root`` (a copy of src/liftft) that runs up or sideways between layers, one line each."""
    wrong = []
    for path in sorted(root.rglob("*.py")):
        importer = package_of(".".join(("liftft", *path.relative_to(root).parts)), root)
        for line, module in imported_modules(path, root):
            imported = package_of(module, root)
            if imported != importer and RANK[imported] >= RANK[importer]:
                wrong.append(f"{path.relative_to(root)}:{line}: {importer} imports {module} ({imported})")
    return wrong


def test_every_package_has_a_layer():
    packages = {p.name for p in SOURCE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(RANK) - {"<top>"}


def test_imports_run_only_downward():
    assert upward_imports(SOURCE) == []


@pytest.mark.parametrize("importer, statement, expected", [
    ("engine/layout.py", "from liftft.training.loop import TrainingLoop", "engine imports liftft.training.loop"),
    ("utils/atomic.py", "    from liftft import LiftAdamW", "utils imports liftft (<top>)"),
    ("deltas/merge.py", "from liftft import training", "deltas imports liftft.training (training)"),
    ("analysis/plots.py", "import liftft.reproduce.report", "analysis imports liftft.reproduce.report (reproduce)"),
])
def test_a_planted_upward_import_is_found(tmp_path, importer, statement, expected):
    root = tmp_path / "liftft"
    shutil.copytree(SOURCE, root, ignore=shutil.ignore_patterns("__pycache__"))
    target = root / importer
    planted = "def planted():\n" + (statement if statement.startswith(" ") else "    " + statement) + "\n"
    target.write_text(target.read_text() + "\n\n" + planted)
    found = upward_imports(root)
    assert len(found) == 1 and found[0].startswith(importer + ":") and expected in found[0], found
