"""The real parts that both tests/ and bench/ run: etcd members and clusters, a PKI, the
`docker` CLI, request loops through HAProxy (load.py).

Neither tests/ nor bench/ is a dependency of the other; what both need lives here. The
pytest fixtures around these stay in tests/support/.
"""
