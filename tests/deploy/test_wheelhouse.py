"""deploy/wheelhouse.py: the lock pip installs with --require-hashes, and the SBOM.

The adversary: whoever handles the wheelhouse between the connected machine and the
site (a swapped or altered wheel must not install).
"""

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "deploy" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def make_wheel(directory: Path, name: str, version: str, body: str = "X = 1\n", licence: str = "MIT") -> Path:
    path = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}.py", body)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                        f"Summary: test package {name}\nLicense: {licence}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", f"{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


@pytest.fixture
def house(tmp_path):
    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    make_wheel(wh, "alpha_pkg", "1.2.0")
    make_wheel(wh, "beta", "0.3")
    make_wheel(wh, "fedsynth", "0.1.0")  # the release: installed from the tree, not locked
    release = tmp_path / "fedsynth-0.1.0"
    release.mkdir()
    (release / "pyproject.toml").write_text('[project]\nname = "fedsynth"\nversion = "0.1.0"\n'
                                            'license = { text = "Apache-2.0" }\n')
    return wh, release


def _pip_install(wh: Path, lock: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wh),
                           "--require-hashes", "-r", str(lock), "--target", str(target),
                           "--disable-pip-version-check", "--no-cache-dir"],
                          capture_output=True, text=True, timeout=120)


def test_lock_installs_with_require_hashes_and_a_swapped_wheel_is_refused(house, tmp_path):
    wh, _ = house
    lock = tmp_path / "requirements.lock"
    assert wheelhouse.main(["lock", str(wh), "--out", str(lock)]) == 0
    lines = [x for x in lock.read_text().splitlines() if not x.startswith("#")]
    assert [x.split()[0] for x in lines] == ["alpha-pkg==1.2.0", "beta==0.3"]
    assert all(len(x.split("--hash=sha256:")[1].strip()) == 64 for x in lines)
    ok = _pip_install(wh, lock, tmp_path / "t1")
    assert ok.returncode == 0, ok.stderr
    make_wheel(wh, "beta", "0.3", body="X = 'tampered'\n")  # same name and version, other bytes
    bad = _pip_install(wh, lock, tmp_path / "t2")
    assert bad.returncode != 0 and "hash" in bad.stderr.lower()


def test_sbom_lists_every_component_with_hash_and_licence(house, tmp_path):
    wh, release = house
    out = tmp_path / "sbom.cdx.json"
    assert wheelhouse.main(["sbom", str(wh), "--release", str(release), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.5"
    assert doc["metadata"]["component"]["name"] == "fedsynth"
    comps = {c["name"]: c for c in doc["components"]}
    assert set(comps) == {"alpha-pkg", "beta"}
    assert comps["beta"]["purl"] == "pkg:pypi/beta@0.3"
    assert comps["beta"]["hashes"][0]["content"] == wheelhouse.sha256(wh / "beta-0.3-py3-none-any.whl")
    assert comps["alpha-pkg"]["licenses"] == [{"license": {"name": "MIT"}}]


def test_unusable_wheelhouse_is_an_error_not_a_partial_lock(house, tmp_path):
    wh, _ = house
    (wh / "requirements.lock").write_text("# other files beside the packages are fine\n")
    (wh / "not a wheel.whl").write_text("{}")
    assert wheelhouse.main(["lock", str(wh), "--out", str(tmp_path / "l")]) == 2
    (wh / "not a wheel.whl").unlink()
    make_wheel(wh, "beta", "0.4")
    assert wheelhouse.main(["lock", str(wh), "--out", str(tmp_path / "l")]) == 2  # two versions
    assert not (tmp_path / "l").exists()
    assert wheelhouse.main(["lock", str(tmp_path / "none"), "--out", str(tmp_path / "l")]) == 3
