"""fluster's deployer: git push -> build -> registry -> start beside the old -> promote.

- `source.py`     the app's bare repository, its pre-receive hook, `git archive`
- `engine.py`     the Docker Engine API (build, push, containers), errors mapped
- `scheduler.py`  where a version's containers run (`LocalScheduler`: this engine)
- `swarm.py`      `SwarmScheduler`: a Swarm service per version
- `pipeline.py`   the stages of a deploy and a rollback, printed and recorded
- `images.py`     the image a deploy releases: received, built within bounds, checked
- `dockerfile.py` the images a Dockerfile builds from (FROM, COPY --from)
- `pushes.py`     a push that waited for another refused if that one moved the branch
- `gate.py`       the health gate: instances registered up, or one crashed
- `lock.py`       one deploy per app at a time (a lease-bound key in etcd)
- `apps.py`, `records.py`  app configs and deploy records in etcd
- `gitshell.py`   the forced command that lets a deploy key `git push` and nothing else
- `deploykeys.py` the authorized_keys lines `fluster app keys` writes
- `options.py`    the options of those commands (light: `fluster --help` reads them)
- `cli.py`        the `fluster app|deploy|deploys|rollback APP` commands

It imports the core (`fluster`) only; the core never imports it; `fluster.cli`, above both,
reads `options.py` and loads the rest lazily.
"""
