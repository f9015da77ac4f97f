"""Fixtures shared by the site's tests."""

import os

import pytest
import torch


@pytest.fixture
def clean_site_env(monkeypatch, tmp_path):
    """No FEDSYNTH_SITE_* variable or .env from the developer's shell reaches the site code."""
    for key in list(os.environ):
        if key.startswith("FEDSYNTH_SITE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: on a shared 2-core machine, thread
    hand-off dominates their steps, and one thread is several times faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
