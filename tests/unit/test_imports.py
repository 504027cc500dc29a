"""Layering, checked on the source: model code is single-device PyTorch and parallel/ sits below train/.

Every `import` / `from ... import` anywhere in a file counts (also one inside a function), parsed with
`ast`, so a lazy import cannot slip through.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "mmkit"
SINGLE_DEVICE_BANNED = ("mmkit.parallel", "mmkit.train", "mmkit.infer", "torch.distributed")


def imported_modules(path: Path, root: Path) -> set[str]:
    """Absolute module names a file under `root` (the folder holding the package) imports, anywhere in
    it; relative imports resolved, `from a import b` counted as both `a` and `a.b`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # from . import x / from ..a import b
                mod = ".".join([*package[: len(package) - node.level + 1], *([mod] if mod else [])])
            found.add(mod)
            found.update(f"{mod}.{alias.name}" for alias in node.names)  # `from mmkit import train`
    return found


def violations(pkg: Path, folder: str, banned: tuple[str, ...]) -> list[str]:
    """'file imports module' for every banned module (or submodule) a file under pkg/folder imports."""
    out = []
    for path in sorted((pkg / folder).rglob("*.py")):
        for mod in sorted(imported_modules(path, pkg.parent)):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                out.append(f"{path.relative_to(pkg.parent).as_posix()} imports {mod}")
    return out


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    toy = tmp_path / "mmkit" / "models" / "toy"
    toy.mkdir(parents=True)
    (toy / "model.py").write_text(
        "import torch\nfrom mmkit.models.common import ops\n"
        "def f():\n    import torch.distributed as dist\n    from mmkit.parallel.comm import x\n"
        "from ...train import losses\nfrom mmkit import infer\n"
    )
    assert violations(tmp_path / "mmkit", "models", SINGLE_DEVICE_BANNED) == [
        "mmkit/models/toy/model.py imports mmkit.infer",
        "mmkit/models/toy/model.py imports mmkit.parallel.comm",
        "mmkit/models/toy/model.py imports mmkit.parallel.comm.x",
        "mmkit/models/toy/model.py imports mmkit.train",
        "mmkit/models/toy/model.py imports mmkit.train.losses",
        "mmkit/models/toy/model.py imports torch.distributed",
    ]


def test_models_are_single_device_code():
    assert violations(PKG, "models", SINGLE_DEVICE_BANNED) == []


@pytest.mark.parametrize("folder", ["parallel", "models"])
def test_parallel_and_models_do_not_import_train(folder):
    assert violations(PKG, folder, ("mmkit.train",)) == []


@pytest.mark.parametrize(
    "folder, banned",
    [
        ("train", ("mmkit.convert",)),  # train/ and convert/ meet only in checkpoint/
        ("convert", ("mmkit.train",)),
        ("checkpoint", ("mmkit.train", "mmkit.convert", "mmkit.infer", "mmkit.cli")),
        ("parallel", ("mmkit.infer", "mmkit.convert", "mmkit.cli", "mmkit.tools")),  # tools/ is not runtime
        # data/ writes its synthetic clips with infer/media.py's video writer (not yet moved below)
        ("data", ("mmkit.train", "mmkit.parallel", "mmkit.convert", "mmkit.cli")),
    ],
)
def test_floors(folder, banned):
    """Each floor imports only the floors below it (docs/architecture.md)."""
    assert violations(PKG, folder, banned) == []


def test_registry_is_the_bottom_floor():
    """registry.py imports nothing of mmkit at module level (specs are loaded lazily)."""
    tree = ast.parse((PKG / "registry.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mmkit")]
