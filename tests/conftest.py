"""Fixtures shared by every test module live in tests/support/, one module per real part."""

pytest_plugins = [
    "tests.support.waiting",  # first: the others import it
    "tests.support.etcd",
    "tests.support.haproxy",
    "tests.support.rbac",
    "tests.support.docker",
    "tests.support.sidekick",
    "tests.support.swarm",
]
