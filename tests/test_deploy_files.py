"""deploy/: compose files parse, env examples match the settings classes, units call real scripts.

The env examples are the operator's contract: every ``FEDSYNTH_SITE_*`` /
``FEDSYNTH_COORD_*`` line must be a settings field (a typo would be silently
ignored by the shell but refused by pydantic), every field must be there, and
the values must load. Every other variable must be one a script reads.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.settings import CoordinatorSettings, SiteSettings

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
INSTALL = "/opt/fedsynth/"  # where the units expect the release (docs/hospital-it.md)
ACTIVE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")
OPTIONAL = re.compile(r"^#([A-Z][A-Z0-9_]*)=(.*)$")  # "#VAR=value": optional, example value
# Read by libraries rather than by the scripts.
LIBRARY_VARS = {"FLWR_HOME", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "FEDSYNTH_CACHE_DIR", "FEDSYNTH_SECRETS_DIR"}
EXAMPLES = {
    "site": (DEPLOY / "site.env.example", SiteSettings, "FEDSYNTH_SITE_", DEPLOY / "site.sh",
             ROOT / "docs" / "hospital-it.md"),
    "coordinator": (DEPLOY / "coordinator.env.example", CoordinatorSettings, "FEDSYNTH_COORD_",
                    DEPLOY / "coordinator.sh", ROOT / "docs" / "coordinator.md"),
}


def parse_env(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(active, optional) assignments; any other non-comment line is an error."""
    active: dict[str, str] = {}
    optional: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if m := ACTIVE.match(line):
            assert m.group(1) not in active, f"{path}:{number}: {m.group(1)} set twice"
            assert not re.search(r"[\s'\"$#]", m.group(2)), \
                f"{path}:{number}: keep values plain (systemd/compose read them literally)"
            active[m.group(1)] = m.group(2)
        elif m := OPTIONAL.match(line):
            optional[m.group(1)] = m.group(2)
        else:
            assert not line.strip() or line.startswith("# ") or line == "#" or line.startswith("## "), \
                f"{path}:{number}: not KEY=VALUE or a comment: {line!r}"
    return active, optional


@pytest.mark.parametrize("side", EXAMPLES)
def test_env_example_matches_settings_fields_both_ways(side):
    path, cls, prefix, _, _ = EXAMPLES[side]
    active, optional = parse_env(path)
    in_example = {k for k in {**active, **optional} if k.startswith(prefix)}
    fields = {prefix + name.upper() for name in cls.model_fields}
    assert in_example - fields == set(), "not settings fields (typo?)"
    assert fields - in_example == set(), "settings fields missing from the example"


@pytest.mark.parametrize("side", EXAMPLES)
def test_env_example_values_are_accepted(side, monkeypatch):
    path, cls, prefix, _, _ = EXAMPLES[side]
    active, optional = parse_env(path)
    for key in list(os.environ):
        if key.startswith(prefix):
            monkeypatch.delenv(key)
    for key, value in {**active, **optional}.items():
        monkeypatch.setenv(key, value)
    settings = cls(_env_file=None)
    for key, value in {**active, **optional}.items():
        if key.startswith(prefix):
            got = getattr(settings, key[len(prefix):].lower())
            if isinstance(got, bool):
                assert got == (value.lower() in ("true", "1", "yes", "on")), key
            else:
                assert str(got) == value or float(got) == float(value), key


def test_site_example_agrees_with_the_node_config_site_sh_passes():
    # In a round the SuperNode's node config (data-dir, site-id) overrides these settings;
    # the example keeps them equal so `fedsynth-site` commands see the same files.
    active, _ = parse_env(DEPLOY / "site.env.example")
    data = Path(active["FEDSYNTH_DATA_DIR"])
    assert active["FEDSYNTH_SITE_SITE_ID"] == active["FEDSYNTH_DEPLOY_SITE_ID"]
    assert Path(active["FEDSYNTH_SITE_NOTES_PATH"]) == data / "notes.jsonl"
    assert Path(active["FEDSYNTH_SITE_OUTPUT_DIR"]) == data / "output"
    assert Path(active["FEDSYNTH_SITE_LEDGER_PATH"]).parent == data / "output"


@pytest.mark.parametrize("side", EXAMPLES)
def test_env_example_variables_are_read_by_the_script_and_documented(side):
    path, _, prefix, script, doc = EXAMPLES[side]
    active, optional = parse_env(path)
    source = script.read_text()
    read_by_script = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", source))
    settings_vars = {k for k in {**active, **optional} if k.startswith(prefix)}
    unused = set(active) - settings_vars - LIBRARY_VARS - read_by_script
    assert unused == set(), f"set in {path.name} but read by nothing"
    required = set(re.findall(r'\$\{([A-Z][A-Z0-9_]*):\?', source))
    assert required - set(active) == set(), f"{script.name} requires these; the example lacks them"
    text = doc.read_text()
    undocumented = sorted(k for k in {**active, **optional} if k not in text)
    assert undocumented == [], f"not explained in {doc.relative_to(ROOT)}"


@pytest.mark.parametrize("name", ["compose.coordinator.yml", "compose.site.yml"])
def test_compose_files_parse(name):
    spec = yaml.safe_load((DEPLOY / name).read_text())
    assert spec["services"]
    for service in spec["services"].values():
        assert service.get("image", "").startswith("fedsynth-")


def test_coordinator_control_api_is_loopback_only():
    spec = yaml.safe_load((DEPLOY / "compose.coordinator.yml").read_text())
    superlink = spec["services"]["superlink"]
    control = parse_env(DEPLOY / "coordinator.env.example")[0]["FEDSYNTH_CONTROL_PORT"]
    # Host networking: coordinator.sh's --host 127.0.0.1 is the host's loopback.
    assert superlink["network_mode"] == "host"
    assert "--host 127.0.0.1 --port \"$CONTROL_PORT\"" in (DEPLOY / "coordinator.sh").read_text()
    for spec_port in superlink.get("ports", []):
        assert control not in str(spec_port) or str(spec_port).startswith("127.0.0.1:")


def test_site_compose_gives_only_the_launcher_the_gpu_and_the_data():
    services = yaml.safe_load((DEPLOY / "compose.site.yml").read_text())["services"]
    devices = services["launcher"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["launcher"]["network_mode"] == "service:supernode"
    assert "deploy" not in services["supernode"]
    assert all(v.endswith(":ro") or "/flwr:" in v for v in services["supernode"]["volumes"])
    assert [services[s]["command"] for s in ("supernode", "launcher")] == [["supernode"], ["launcher"]]


def _docker_compose_works() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _docker_compose_works(), reason="no working `docker compose`")
@pytest.mark.parametrize("name", ["compose.coordinator.yml", "compose.site.yml"])
def test_docker_compose_config_accepts_the_files(name, tmp_path):
    env = tmp_path / "x.env"
    env.write_text("FEDSYNTH_PKI=/srv/fedsynth/pki\n")
    out = subprocess.run(["docker", "compose", "-f", str(DEPLOY / name), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60,
                         env=os.environ | {"FEDSYNTH_ENV": str(env)})
    assert out.returncode == 0 or "env file" in out.stderr, out.stderr


def _units() -> list[Path]:
    return sorted((DEPLOY / "systemd").glob("*.service"))


def _unit_values(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in path.read_text().splitlines()
            if line.startswith(key + "=")]


def test_systemd_units_call_existing_scripts():
    names = {p.name for p in _units()}
    assert names == {"fedsynth-superlink.service", "fedsynth-supernode@.service", "fedsynth-launcher@.service"}
    for unit in _units():
        (exec_start,) = _unit_values(unit, "ExecStart")
        script = exec_start.split()[0]
        assert script.startswith(INSTALL + "deploy/"), unit.name
        local = ROOT / script[len(INSTALL):]
        assert local.is_file() and os.access(local, os.X_OK), f"{unit.name}: {local} missing or not executable"
        for env_file in _unit_values(unit, "EnvironmentFile"):
            assert env_file.startswith("/etc/fedsynth/"), unit.name
        assert any(v.startswith("PATH=" + INSTALL + ".venv/bin:") for v in _unit_values(unit, "Environment"))
    launcher = (DEPLOY / "systemd" / "fedsynth-launcher@.service").read_text()
    assert "BindsTo=fedsynth-supernode@%i.service" in launcher  # revocation stops the launcher too


def test_dockerfiles_install_offline_with_telemetry_off():
    for name in ("site.Dockerfile", "coordinator.Dockerfile"):
        text = (DEPLOY / name).read_text()
        installs = [line for line in text.splitlines() if "pip install" in line]
        assert installs and all("--no-index" in line and "--find-links /wheelhouse" in line for line in installs)
        for setting in ("FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1", "HF_HUB_OFFLINE=1",
                        "PIP_NO_INDEX=1"):
            assert setting in text, (name, setting)
        (entry,) = re.findall(r'ENTRYPOINT \["([^"]+)"\]', text)
        assert (ROOT / entry[len(INSTALL):]).is_file()
        assert "USER fedsynth" in text


@pytest.mark.parametrize("script", ["coordinator.sh", "site.sh"])
def test_scripts_pass_bash_n(script):
    out = subprocess.run(["bash", "-n", str(DEPLOY / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _fake_bin(tmp_path: Path) -> Path:
    """flower-supernode and python stand-ins that record their argv and exit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("flower-supernode", "python"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n')
        tool.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("role", ["supernode", "launcher"])
def test_site_script_runs_the_role_each_unit_asks_for(role, tmp_path):
    # site.sh must take the role the systemd units pass (`site.sh supernode|launcher`):
    # no skip when it does not, the assertions below fail instead
    active, _ = parse_env(DEPLOY / "site.env.example")
    env = {k: v for k, v in active.items()} | {
        "PATH": f"{_fake_bin(tmp_path)}:/usr/bin:/bin", "FEDSYNTH_INSTALL_DIR": str(tmp_path),
        "FEDSYNTH_PYTHON": "python", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(DEPLOY / "site.sh"), role], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1
    if role == "supernode":
        assert calls[0].startswith("flower-supernode --superlink coordinator.example.org:9092")
        assert "--isolation process" in calls[0] and "--host 127.0.0.1" in calls[0]
    else:
        assert calls[0].startswith("python -m client.launcher serve --runtime-api-address 127.0.0.1:9094")
        assert "--pin /srv/site/pin.json" in calls[0]


def _patterns(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def test_ignore_files_keep_notes_outputs_and_secrets_out():
    git = ROOT / ".gitignore"
    docker = ROOT / ".dockerignore"
    for must in (".env", "*.key", "notes.jsonl", "notes.csv", "/site-output/", "/coordinator-output/"):
        assert must in _patterns(git), f".gitignore lacks {must}"
    for must in (".git", ".venv", ".env", "**/*.key", "**/*.secret", "**/notes.jsonl", "**/notes.csv",
                 "site-output", "coordinator-output", "wheelhouse", "runs"):
        assert must in _patterns(docker), f".dockerignore lacks {must}"
    # .gitignore must reach the image: Flower filters the FAB (and so the pin) with it
    assert ".gitignore" not in _patterns(docker)
    for path in ("site-a/notes.jsonl", "pki/site-a.key", ".env", "site-output/x"):
        out = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", "-q", path],
                             capture_output=True)
        assert out.returncode == 0, f"{path} is not ignored by git"
    kept = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", "-q",
                           "deploy/site.env.example"], capture_output=True)
    assert kept.returncode == 1, "the env examples must stay tracked"


def test_supernode_runs_as_its_own_user_without_the_notes():
    supernode = DEPLOY / "systemd" / "fedsynth-supernode@.service"
    launcher = DEPLOY / "systemd" / "fedsynth-launcher@.service"
    assert _unit_values(supernode, "User") == ["fedsynth-net"]
    assert _unit_values(launcher, "User") == ["fedsynth"]
    hidden = " ".join(_unit_values(supernode, "InaccessiblePaths")).split()
    for path in ("/srv/site/data", "/srv/site/keys", "/srv/site/models"):
        assert f"-{path}" in hidden or path in hidden
    writable = " ".join(_unit_values(supernode, "ReadWritePaths")).split()
    assert writable == ["/srv/site/flwr"]  # not /srv/site: nothing of the site's data
    compose = yaml.safe_load((DEPLOY / "compose.site.yml").read_text())["services"]
    assert compose["supernode"]["user"] == "10002:10002"  # same uid as fedsynth-net
    assert "user" not in compose["launcher"]  # the image's fedsynth, uid 10001


def test_docs_and_images_agree_on_the_service_uids():
    doc = (ROOT / "docs" / "hospital-it.md").read_text()
    for dockerfile in ("site.Dockerfile", "coordinator.Dockerfile"):
        text = (DEPLOY / dockerfile).read_text()
        assert "--uid 10001" in text and "--gid 10001" in text
    assert re.search(r"groupadd --system --gid 10001 fedsynth\b", doc)
    assert re.search(r"useradd --system --uid 10001 --gid fedsynth\b", doc)
    assert re.search(r"useradd --system --uid 10002 --gid fedsynth-net\b", doc)
    assert "huggingface-cli download" not in doc and "hf download" in doc
    assert "install -d" in doc and "/etc/fedsynth" in doc
    assert "v0.1.0 >" not in doc  # there is no such tag: archive the agreed commit


def test_installs_are_hash_checked_against_the_lock():
    for name in ("site.Dockerfile", "coordinator.Dockerfile"):
        text = (DEPLOY / name).read_text()
        assert "--require-hashes -r /wheelhouse/requirements.lock" in text, name
        assert "--no-deps" in text  # the release itself adds no unchecked dependency
    for doc in ("hospital-it.md", "coordinator.md"):
        text = (ROOT / "docs" / doc).read_text()
        assert "--require-hashes -r /path/to/wheelhouse/requirements.lock" in text, doc
    assert "wheelhouse.py sbom" in (ROOT / "docs" / "hospital-it.md").read_text()
