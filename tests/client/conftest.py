"""Fixtures shared by the site's tests."""

import os

import pytest


@pytest.fixture
def clean_site_env(monkeypatch, tmp_path):
    """No FEDSYNTH_SITE_* variable or .env from the developer's shell reaches the site code."""
    for key in list(os.environ):
        if key.startswith("FEDSYNTH_SITE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
