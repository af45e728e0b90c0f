"""Shared fixtures. Keep them generic: several test modules (and authors) build on them.

Bundle fixtures come from :mod:`simulator` (in-memory keys, roots and bundles); host fixtures
drive the real ``appliance.installer.Appliance`` on a directory under ``tmp_path``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from localhttp import LocalServer
from simulator import BundleSimulator, Host


@pytest.fixture
def sim() -> BundleSimulator:
    """Fresh keys: 2-of-2 bundle keys, 1-of-1 root key, a root valid for a year."""
    return BundleSimulator()


@pytest.fixture
def host(tmp_path: Path, sim: BundleSimulator) -> Host:
    """A host directory that trusts ``sim``'s root (``trust init``), nothing installed."""
    made = Host(root=tmp_path / "host", bundles=tmp_path / "bundles", sim=sim)
    made.trust_init()
    return made


@pytest.fixture
def installed_host(host: Host) -> Host:
    """``host`` with a good ``demo 1.0.0`` installed and active."""
    host.install(host.sim.bundle("1.0.0"))
    return host


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A real HTTP server on loopback serving ``tmp_path / "www"`` (see tests/localhttp.py)."""
    root = tmp_path / "www"
    root.mkdir()
    with LocalServer(root) as server:
        yield server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``online`` reach a real package registry: run only when asked
    (``AIRGAP_TEST_ONLINE=1``), so that the default suite never depends on the network."""
    if os.environ.get("AIRGAP_TEST_ONLINE") == "1":
        return
    skip = pytest.mark.skip(reason="online: set AIRGAP_TEST_ONLINE=1 to run")
    for item in items:
        if "online" in item.keywords:
            item.add_marker(skip)
