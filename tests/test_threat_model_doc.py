"""docs/privacy-model.md's threat-model table names tests: each one must exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_threat_model_names_exists():
    doc = (ROOT / "docs" / "privacy-model.md").read_text(encoding="utf-8")
    table = doc.split("## Threat model", 1)[1].split("\n## ", 1)[0]
    named, current = [], None
    for ref in re.findall(r"`([A-Za-z0-9_/.]+\.py)?(::[A-Za-z0-9_]+)?`", table):
        path, name = ref
        if path and not Path(path).name.startswith("test_"):
            continue  # a source module named in the "what protects" column
        if path:
            current = path
        if current and (path or name):
            named.append((current, name[2:] if name else None))
    assert len(named) >= 20
    missing = []
    for path, name in named:
        source = ROOT / "tests" / path
        if not source.is_file():
            missing.append(path)
        elif name and not re.search(rf"^def {name}\(", source.read_text(encoding="utf-8"), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, missing
