"""Project layout rules of ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_components():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "mmllm").rglob("*.py") if "components" in _imports(p)]
    assert offenders == [], f"mmllm/ must not import components/: {offenders}"


def test_layout_check_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom components.foo import module\n")
    assert "components" in _imports(bad)


def test_top_level_layout():
    for name in ("mmllm", "mmllm/conf", "docs/architecture.md", "notebooks", "tests", "benchmarks",
                 "pyproject.toml", "README.md", "CONTRIBUTING.md", ".ci/run"):
        assert (REPO / name).exists(), name


def test_nothing_refers_outside_the_repository():
    """The kit carries its own design (docs/architecture.md); no file points at a path beside it."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    needle = "../" + "shared"  # split so this file does not match itself
    offenders = [f for f in files if (REPO / f).is_file()
                 and needle in (REPO / f).read_text(encoding="utf-8", errors="ignore")]
    assert offenders == []


def test_every_component_is_complete_and_composes_with_one_override():
    """components/<variant>/: module code, README, tests and conf; each of its configs composes
    into `mmllm train` with one override (the hydra_plugins search-path plugin finds them)."""
    from mmllm.config import compose_config

    variants = [p for p in (REPO / "components").iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
    assert variants, "no research variant in components/"
    for v in variants:
        assert (v / "README.md").is_file() and (v / "tests").is_dir() and (v / "conf").is_dir(), v.name
        assert "## Measured" in (v / "README.md").read_text(), f"{v.name}: README has no measured result"
        for yaml in (v / "conf").glob("*/*.yaml"):
            group, name = yaml.parent.name, yaml.stem
            cfg = compose_config("train", [f"{group}={name}"])
            assert cfg is not None, f"{v.name}: {group}={name}"
    plugin = REPO / "hydra_plugins" / "mmllm_components" / "__init__.py"
    assert "components" not in _imports(plugin)
