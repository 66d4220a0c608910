import os
import sys

# The bench's own etcd client sits idle for minutes (P6); gRPC's logging of etcd's
# "too_many_pings" GOAWAY on that idle channel would only clutter the table.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from bench.cli import main

sys.exit(main())
