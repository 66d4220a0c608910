"""docker-registry for the deploy tests: testbed/registry.py, shared with the bench."""

from testbed.registry import REGISTRY, Registry

__all__ = ["REGISTRY", "Registry"]
