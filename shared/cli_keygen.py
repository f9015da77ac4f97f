"""The ``keygen`` command of ``fedsynth-site`` and ``fedsynth-coordinator``: one Ed25519 key pair.

Both command lines create their signing key the same way (:func:`shared.signing.generate_key`:
the private key at ``PATH`` with mode 600, the public key at ``PATH.pub``) and tell the
operator the same three things; only the setting that names the key and where the public
key goes differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

KeyPathArg = Annotated[
    Path, typer.Argument(help="Private key file to create (the public key goes to PATH.pub).")
]
OverwriteKeyOpt = Annotated[
    bool, typer.Option(help="Replace an existing key (orphans its signatures).")
]


def create_key_pair(path: Path, *, overwrite: bool, env_var: str, public_key_note: str) -> list[str]:
    """Create the key pair at ``path`` / ``path.pub``; the lines that tell the operator what to do.

    ``env_var``: the setting that points the command line at the private key;
    ``public_key_note``: where the public key goes (auditors verify signatures with it).
    Refuses an existing key unless ``overwrite`` (:class:`~shared.errors.ConfigError`).
    """
    from shared.signing import generate_key, key_id, load_public_key

    pub = generate_key(path, overwrite=overwrite)
    return [
        f"private key: {path} (mode 600; set {env_var}={path})",
        f"public key:  {pub} ({public_key_note})",
        f"key id:      {key_id(load_public_key(pub))}",
    ]
