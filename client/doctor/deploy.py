"""``fedsynth-site doctor``: the deployment's wiring — the launcher's pin and the site's identity.

Two mistakes that otherwise show only in the first round:

- the pin (``FEDSYNTH_PIN``) is missing, unreadable, or pins another tree than the
  installed one (``FEDSYNTH_INSTALL_DIR``): the launcher then refuses every run of
  this release (``REFUSED run … bundle_not_trusted``), or accepts another one;
- the site id the SuperNode passes (``FEDSYNTH_DEPLOY_SITE_ID``) differs from
  ``FEDSYNTH_SITE_SITE_ID``, or the signing key is not named after it, or the
  site's audit log was signed by another key: ``fedsynth-site`` commands then
  look at another site's records, and auditors (``fedsynth-verify --keys-dir``,
  which names a key by its file name) cannot tell whose reports these are.
"""

from __future__ import annotations

import json
from pathlib import Path

from client.doctor.checks import Check, fail_check, warn_check
from shared.errors import FedsynthError
from shared.settings import SiteSettings


def check_pin(pin: Path | None, install_dir: Path | None) -> Check:
    """The launcher's pin exists, parses, and matches the bundle built from the installed tree."""
    from client.bundle_trust import build_bundle, bundle_id, load_pin

    name = "release pin"
    make = "cd /opt/fedsynth && .venv/bin/python -m client.launcher pin /opt/fedsynth --out /srv/site/pin.json"
    if pin is None:
        return fail_check(name, "FEDSYNTH_PIN unset: the launcher cannot start", make)
    try:
        pinned = load_pin(pin)
    except FedsynthError as exc:
        reason = "; ".join(f"{p.where}: {p.reason}" for p in exc.problems) or exc.message
        return fail_check(name, f"{pin}: {exc.message}: {reason}", make)
    if install_dir is None:
        return warn_check(name, f"{pin}: sha256 {pinned.sha256[:16]}…; FEDSYNTH_INSTALL_DIR unset, "
                          "so not compared with the installed tree", "set FEDSYNTH_INSTALL_DIR=/opt/fedsynth")
    try:
        installed = bundle_id(build_bundle(install_dir))
    except Exception as exc:  # noqa: BLE001 - any unreadable tree is one failed check
        return fail_check(name, f"cannot build the bundle of {install_dir} ({type(exc).__name__})",
                          "point FEDSYNTH_INSTALL_DIR at the installed release (it holds pyproject.toml)")
    if installed != pinned:
        return fail_check(
            name, f"{pin} pins {pinned.name} {pinned.version} sha256 {pinned.sha256[:16]}…, but "
            f"{install_dir} is {installed.name} {installed.version} sha256 {installed.sha256[:16]}…",
            "re-pin only after comparing the release's sha256 out of band (hospital-it.md step 5); "
            "an edited file under the install dir also changes it")
    return Check(name, True, f"{pin}: {pinned.name} {pinned.version} sha256 {pinned.sha256[:16]}… "
                 f"= {install_dir}")


def check_site_identity(settings: SiteSettings, deploy_site_id: str | None,
                        configured_site_id: str | None) -> Check:
    """FEDSYNTH_DEPLOY_SITE_ID = FEDSYNTH_SITE_SITE_ID; the signing key is ``<site-id>.key`` and
    signed this site's audit log (when there is one)."""
    from shared.signing import key_id, load_private_key

    name = "site identity"
    site = deploy_site_id or settings.site_id
    if deploy_site_id and configured_site_id and deploy_site_id != configured_site_id:
        return fail_check(name, f"FEDSYNTH_DEPLOY_SITE_ID={deploy_site_id} but "
                          f"FEDSYNTH_SITE_SITE_ID={configured_site_id}",
                          "set both to the site id the coordinator registered")
    if settings.signing_key is None:
        return warn_check(name, f"site {site}; no signing key to compare", "set FEDSYNTH_SITE_SIGNING_KEY")
    key_path = Path(settings.signing_key)
    stem = key_path.name.removesuffix(".key")
    if stem != site:
        return fail_check(name, f"site {site} but the signing key is {key_path.name}: auditors' "
                          f"fedsynth-verify --keys-dir would call its reports {stem!r}'s",
                          f"rename it to {key_path.with_name(site + '.key')} (and its .pub to "
                          f"{site}.key.pub), update FEDSYNTH_SITE_SIGNING_KEY")
    audit = Path(settings.output_dir) / "audit.jsonl"
    try:
        kid = key_id(load_private_key(key_path))
        with audit.open("rb") as fh:
            first = json.loads(fh.readline(64 * 1024) or b"{}")
    except FileNotFoundError:
        return Check(name, True, f"site {site}, signing key {key_path.name} (no audit log yet)")
    except (FedsynthError, OSError, ValueError):
        return Check(name, True, f"site {site}, signing key {key_path.name} (see the signing key check)")
    signed_by, actor = first.get("key_id"), first.get("actor")
    if actor not in (None, site) or signed_by not in (None, kid):
        who = f"site {actor!r}" if actor not in (None, site) else f"key {signed_by}"
        return fail_check(name, f"{audit} was written by {who}, not site {site} with key {kid}",
                          "use the site's own FEDSYNTH_SITE_SITE_ID and signing key (restore the key "
                          "from backup; a new key cannot sign the old records)")
    return Check(name, True, f"site {site}, signing key {key_path.name} ({kid}) signed {audit.name}")
