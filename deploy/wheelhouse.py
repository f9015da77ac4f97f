#!/usr/bin/env python3
"""The offline wheelhouse's lock (pip hashes) and the release's SBOM (CycloneDX JSON).

Run on the connected machine that built the wheelhouse (docs/hospital-it.md step 1),
with any Python 3.11+; standard library only, so it runs before anything is installed:

    python3 deploy/wheelhouse.py lock WHEELHOUSE --out requirements.lock
    python3 deploy/wheelhouse.py sbom WHEELHOUSE --release RELEASE_DIR --out sbom.cdx.json

``lock`` writes one ``name==version --hash=sha256:…`` line per package (every file of
that version in the wheelhouse, e.g. several platforms, gets its hash), for
``pip install --no-index --find-links WHEELHOUSE --require-hashes -r requirements.lock``:
pip then refuses any file whose sha256 is not in the lock, so a wheelhouse swapped or
altered in transit does not install. Publish the lock's sha256 with the release and
compare it out of band, like the pin. The release itself (``fedsynth-*``) is left out:
it is installed from the pinned tree with ``--no-deps``.

``sbom`` lists every component (name, version, licence as declared in the wheel's
metadata, sha256 of the file, purl) plus the release (name and version from its
pyproject.toml), as CycloneDX 1.5 JSON for the hospital's vulnerability management.

Exit codes: 0 written; 2 usage error or a file whose name is not a wheel/sdist name;
3 unreadable wheelhouse or release.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tomllib
import uuid
import zipfile
from datetime import UTC, datetime
from email.parser import HeaderParser
from pathlib import Path

WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")
SDIST = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)-(?P<version>\d[^-]*)\.(tar\.gz|zip)$")
EXCLUDE_DEFAULT = ("fedsynth",)


class Unusable(Exception):
    """A wheelhouse file or release that cannot be locked; ``code`` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def normalize(name: str) -> str:
    """PEP 503 name (what pip compares)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scan(wheelhouse: Path, exclude: tuple[str, ...] = EXCLUDE_DEFAULT) -> dict[tuple[str, str], list[Path]]:
    """(normalized name, version) -> the files of that package in ``wheelhouse``."""
    if not wheelhouse.is_dir():
        raise Unusable(f"{wheelhouse}: not a directory", 3)
    found: dict[tuple[str, str], list[Path]] = {}
    bad = []
    packages = (p for p in wheelhouse.iterdir() if p.is_file() and p.name.endswith((".whl", ".tar.gz", ".zip")))
    for path in sorted(packages):  # other files (the lock, the SBOM) may live beside them
        m = WHEEL.match(path.name) or SDIST.match(path.name)
        if m is None:
            bad.append(path.name)
            continue
        name = normalize(m["name"])
        if name in {normalize(e) for e in exclude}:
            continue
        found.setdefault((name, m["version"]), []).append(path)
    if bad:
        raise Unusable(f"{wheelhouse}: not a wheel or sdist name: {', '.join(bad)}", 2)
    if not found:
        raise Unusable(f"{wheelhouse}: no packages", 3)
    versions: dict[str, list[str]] = {}
    for name, version in found:
        versions.setdefault(name, []).append(version)
    twice = {n: v for n, v in versions.items() if len(v) > 1}
    if twice:  # a lock pins one version per package
        raise Unusable("more than one version of: " + ", ".join(f"{n} ({', '.join(v)})" for n, v in twice.items()), 2)
    return found


def lock_text(found: dict[tuple[str, str], list[Path]]) -> str:
    lines = ["# fedsynth wheelhouse lock: pip install --no-index --find-links WHEELHOUSE "
             "--require-hashes -r THIS_FILE"]
    for (name, version), files in sorted(found.items()):
        hashes = " ".join(f"--hash=sha256:{sha256(p)}" for p in files)
        lines.append(f"{name}=={version} {hashes}")
    return "\n".join(lines) + "\n"


def _wheel_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".whl":
        return {}
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
            if name is None:
                return {}
            headers = HeaderParser().parsestr(zf.read(name).decode("utf-8", "replace"))
    except (OSError, zipfile.BadZipFile) as exc:
        raise Unusable(f"{path}: unreadable wheel ({exc})", 3) from None
    licence = headers.get("License-Expression") or headers.get("License") or ""
    if not licence or len(licence) > 100:  # some wheels put the whole licence text here
        classifiers = [c for c in headers.get_all("Classifier") or [] if c.startswith("License ::")]
        licence = classifiers[0].rsplit("::", 1)[-1].strip() if classifiers else ""
    return {"license": licence, "summary": headers.get("Summary") or ""}


def sbom(found: dict[tuple[str, str], list[Path]], release: Path, *, now: datetime | None = None) -> dict:
    """A CycloneDX 1.5 document: the release as the subject, every package as a component."""
    try:
        project = tomllib.loads((release / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise Unusable(f"{release}: no readable pyproject.toml [project] ({exc})", 3) from None
    components = []
    for (name, version), files in sorted(found.items()):
        meta = _wheel_metadata(files[0])
        comp: dict = {
            "type": "library", "bom-ref": f"pkg:pypi/{name}@{version}", "name": name, "version": version,
            "purl": f"pkg:pypi/{name}@{version}",
            "hashes": [{"alg": "SHA-256", "content": sha256(p)} for p in files],
            "properties": [{"name": "fedsynth:file", "value": p.name} for p in files],
        }
        if meta.get("license"):
            comp["licenses"] = [{"license": {"name": meta["license"]}}]
        if meta.get("summary"):
            comp["description"] = meta["summary"][:200]
        components.append(comp)
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "metadata": {
            "timestamp": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "component": {"type": "application", "bom-ref": "release", "name": str(project["name"]),
                          "version": str(project.get("version", "")),
                          "licenses": [{"license": {"name": str((project.get("license") or {}).get("text", ""))}}]},
        },
        "components": components,
        "dependencies": [{"ref": "release", "dependsOn": [c["bom-ref"] for c in components]}],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wheelhouse.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("lock", "sbom"):
        p = sub.add_parser(name)
        p.add_argument("wheelhouse", type=Path)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--exclude", action="append", default=list(EXCLUDE_DEFAULT),
                       help="package left out (default: fedsynth, installed from the tree)")
    sub.choices["sbom"].add_argument("--release", type=Path, required=True, help="the release tree")
    args = parser.parse_args(argv)
    try:
        found = scan(args.wheelhouse, tuple(args.exclude))
        if args.cmd == "lock":
            args.out.write_text(lock_text(found), encoding="utf-8")
        else:
            args.out.write_text(json.dumps(sbom(found, args.release), indent=2) + "\n", encoding="utf-8")
    except Unusable as exc:
        print(f"wheelhouse.py: error: {exc}", file=sys.stderr)
        return exc.code
    print(f"{args.out}: {len(found)} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
