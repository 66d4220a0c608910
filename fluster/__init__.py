"""fluster: service discovery for Docker containers on etcd, routed by HAProxy."""

import os

# Every fluster process holds gRPC channels (etcd) while it forks children that never use
# gRPC: `git archive` and `git` in a deploy, `haproxy -c` in the reloader. gRPC's fork
# handlers then log "skipping fork() handlers" and the child has been seen to die with
# SIGSEGV before exec (`git archive: exit status -11` in about one deploy in six here).
# Switched off before grpc is first imported, which any fluster module import precedes.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
