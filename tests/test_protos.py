"""The committed generated modules match the .proto files, and the layout holds."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_modules_are_in_sync(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / "protos" / rel
        assert committed.exists(), f"{rel} is not committed; run: python scripts/gen_protos.py"
        assert committed.read_text() == (tmp_path / rel).read_text(), (
            f"{rel} is stale; run: python scripts/gen_protos.py")


def test_every_package_folder_is_mapped() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = set(config["packages"])
    found = set()
    for top in ("core", "broker", "proxy", "operator", "protos"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT / top).parts))
    assert found | {"neoplasma"} == mapped
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_python_m_neoplasma_from_the_repo_root() -> None:
    result = subprocess.run([sys.executable, "-m", "neoplasma", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "broker" in result.stdout and "operator" in result.stdout
