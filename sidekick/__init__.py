"""sidekick: keeps apps registered in fluster's etcd registry while they are healthy.

Read in this order:

- `settings.py`  flags and `SIDEKICK_*` variables into one validated `Settings`;
- `plan.py`      what to register for a container or a static address (pure);
- `registration.py`  the core: one record under its own lease, drain, retirement;
- `hub.py`       one etcd watch per service: deleted keys and spec changes;
- `health.py`    rise/fall gating and the HTTP/TCP probes;
- `fluster/docker.py` (in the core, shared with the deployer): the Docker API over
  `fluster/http1.py`, typed, its errors mapped; etcd through `fluster/store_http.py`;
- `agent.py`     the three modes (companion, host agent, static) on that core;
- `status.py`, `cli.py`  `sidekick --check`, and the process around it all.
"""
