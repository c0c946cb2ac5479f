"""A Ray address that is not a reachable Ray cluster fails in seconds, not minutes."""

import socket
import threading
import time

import pytest

from flipsafe.campaign.ray_backend import check_ray_address
from flipsafe.errors import ConfigError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A 127.0.0.1 port that accepts connections and then says nothing."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held = []

    def accept():
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()
    for c in held:
        c.close()


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "closed"])
def test_a_refused_address_fails_fast(address):
    address = address.replace("closed", f"127.0.0.1:{_closed_port()}")
    t = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the Ray cluster"):
        check_ray_address(address, timeout=2)
    assert time.monotonic() - t < 2.5


def test_a_port_that_is_not_ray_fails_after_the_timeout(silent_server):
    t = time.monotonic()
    with pytest.raises(ConfigError, match="does not answer like a Ray"):
        check_ray_address(f"127.0.0.1:{silent_server}", timeout=0.5)
    assert time.monotonic() - t < 2


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:http", ":6379x"])
def test_an_address_without_a_port_is_refused(address):
    with pytest.raises(ConfigError, match="host:port"):
        check_ray_address(address, timeout=0.5)


def test_a_campaign_on_an_unreachable_cluster_fails_in_seconds(mlp_checkpoint, tmp_path):
    pytest.importorskip("ray")
    from flipsafe.campaign.runner import make_plan, run_campaign

    plan = make_plan(mlp_checkpoint, n=8, seed=1)
    t = time.monotonic()
    with pytest.raises(ConfigError, match="127.0.0.1:1"):
        run_campaign(plan, tmp_path / "r", backend="ray", address="127.0.0.1:1",
                     show_progress=False)
    assert time.monotonic() - t < 30
