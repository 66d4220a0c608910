"""The reloader: keeps HAProxy in step with the fluster registry in etcd.

Reading order: app (the pipeline and its tasks), model (the routing model's types) and
build (snapshot -> model), render (model -> text, templates in templates/ =
haproxy/templates/), apply (noop, runtime API or reload) and upkeep (when the files are
written and checked), runtime_api, haproxy (process and CLIs), tls (HTTPS state across
applies), guard, debounce, publish, status, settings, cli.
"""

import os

# The reloader forks HAProxy (and `haproxy -c`) from a process whose gRPC threads are
# busy with the etcd watch. gRPC's fork handlers then log "skipping fork() handlers" and
# the child has been seen to die with SIGSEGV before exec; the children never use gRPC,
# so the handlers are switched off before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
