"""The keygen both command lines share: the key pair and the three lines the operator reads."""

import pytest

from shared.cli_keygen import create_key_pair
from shared.errors import ConfigError
from shared.signing import key_id, load_private_key


def test_key_pair_and_what_to_do_with_it(tmp_path):
    key = tmp_path / "site-a.key"
    lines = create_key_pair(key, overwrite=False, env_var="FEDSYNTH_SITE_SIGNING_KEY",
                            public_key_note="give it to auditors out of band")
    assert lines == [
        f"private key: {key} (mode 600; set FEDSYNTH_SITE_SIGNING_KEY={key})",
        f"public key:  {key}.pub (give it to auditors out of band)",
        f"key id:      {key_id(load_private_key(key))}",
    ]
    assert key.stat().st_mode & 0o777 == 0o600


def test_an_existing_key_is_replaced_only_on_request(tmp_path):
    key = tmp_path / "coordinator.key"
    args = {"env_var": "FEDSYNTH_COORD_SIGNING_KEY", "public_key_note": "n"}
    first = create_key_pair(key, overwrite=False, **args)
    with pytest.raises(ConfigError):
        create_key_pair(key, overwrite=False, **args)
    assert create_key_pair(key, overwrite=True, **args)[2] != first[2]
