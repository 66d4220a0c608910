"""fluster: service discovery for Docker containers on etcd, routed by HAProxy."""

__version__ = "0.1.0"
