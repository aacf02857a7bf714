"""The committed generated modules match the .proto files, and the layout holds."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The lines where the generator writes its own version (and the oldest runtime it allows). A patch
# release of grpcio-tools changes only these; the code they guard is compared as it is.
GENERATOR_VERSION_LINES = [
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = '*'"),
    (re.compile(r"^# Protobuf Python Version: \S+$", re.M), "# Protobuf Python Version: *"),
    (re.compile(r"(_runtime_version\.Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,\s*'[^']*',", re.M), r"\1*,"),
]


def without_generator_version(text: str) -> str:
    for pattern, replacement in GENERATOR_VERSION_LINES:
        text = pattern.sub(replacement, text)
    return text


def generated_modules(root: Path) -> list[Path]:
    """The generated sources below `root` (not their byte code in __pycache__)."""
    return sorted(p.relative_to(root) for p in root.rglob("*_pb2*") if p.suffix in {".py", ".pyi"})


def test_generated_modules_are_in_sync(tmp_path: Path) -> None:
    """Regenerates every module and compares it with the committed one, but for the generator's version."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True)
    generated = generated_modules(tmp_path)
    assert generated, "protoc generated nothing"
    committed_files = generated_modules(ROOT / "protos")
    assert committed_files == generated, "committed and generated modules differ; run: python scripts/gen_protos.py"
    for rel in generated:
        committed = without_generator_version((ROOT / "protos" / rel).read_text())
        assert committed == without_generator_version((tmp_path / rel).read_text()), (
            f"{rel} does not match its .proto; run: python scripts/gen_protos.py")


def test_the_version_check_ignores_only_the_generator_version() -> None:
    """A module differing only in the generator's version passes; one field more does not."""
    module = ROOT / "protos" / "neoplasma" / "wire" / "v1"
    grpc_module = next(module.glob("*_pb2_grpc.py")).read_text()
    pb2_module = next(module.glob("*_pb2.py")).read_text()
    newer_grpc = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '9.99.9'", grpc_module)
    newer_pb2 = re.sub(r"Protobuf Python Version: \S+", "Protobuf Python Version: 9.9.9", pb2_module)
    newer_pb2 = re.sub(r"(Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,", r"\g<1>9,\n    9,\n    9,", newer_pb2)
    assert newer_grpc != grpc_module and newer_pb2 != pb2_module
    assert without_generator_version(newer_grpc) == without_generator_version(grpc_module)
    assert without_generator_version(newer_pb2) == without_generator_version(pb2_module)
    changed = pb2_module.replace("_globals", "_globals2", 1)
    assert without_generator_version(changed) != without_generator_version(pb2_module)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_everything_the_tests_install() -> None:
    """The test environment is the locked one: neoplasma[test] and everything it pulls in is pinned in
    constraints.txt and installed at that version (scripts/test.sh installs with it; scripts/lock.sh makes it)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not NAME==VERSION; run scripts/lock.sh"
            pinned[canonical(name)] = version
    wanted, seen, queue = {}, set(), [("neoplasma", frozenset({"test"}))]
    while queue:
        name, extras = queue.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = metadata.distribution(name)
        if name != "neoplasma":
            wanted[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            queue.append((canonical(req.name), frozenset(req.extras)))
    assert len(wanted) > 40, wanted
    unpinned = sorted(set(wanted) - set(pinned))
    assert not unpinned, f"needed by neoplasma[test] but not in constraints.txt: {unpinned}; run scripts/lock.sh"
    differ = {name: (wanted[name], pinned[name]) for name in wanted if wanted[name] != pinned[name]}
    assert not differ, (f"installed differs from constraints.txt (installed, pinned): {differ}; "
                        "install with scripts/test.sh, or run scripts/lock.sh to take the new versions")


def test_every_package_folder_is_mapped() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = set(config["packages"])
    found = set()
    for top in ("core", "ingest", "local", "broker", "proxy", "operator", "protos"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT / top).parts))
    assert found | {"neoplasma"} == mapped
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_python_m_neoplasma_from_the_repo_root() -> None:
    result = subprocess.run([sys.executable, "-m", "neoplasma", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "broker" in result.stdout and "operator" in result.stdout
