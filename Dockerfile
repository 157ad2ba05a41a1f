# arc: relay, agent, client and guard in one image.
#
#   docker build -t arc:0.1.0 .
#   docker run --read-only -v /etc/arc:/etc/arc:ro -p 8443:8443 arc:0.1.0 \
#       arc-relay --config /etc/arc/relay.yaml
#
# The entrypoint is `twistd -n` (foreground, log on stdout, no pidfile): the
# arguments name the part and its configuration.  For JSON log lines use
# `--entrypoint twist` with `--log-format=json` before the part's name.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Only what the package is built from (no virtualenvs, test output or caches).
COPY pyproject.toml setup.cfg README.md /src/
COPY arc /src/arc
COPY twisted /src/twisted
RUN pip install /src && rm -rf /src

# twistd finds the arc-* commands by scanning twisted/plugins and caches the
# result in dropin.cache.  Write the cache now, as root, so the container can
# run with a read-only root filesystem; then check every part is listed.
RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && python -c "from twisted.application.service import IServiceMaker; \
from twisted.plugin import getPlugins; \
names = {p.tapname for p in getPlugins(IServiceMaker)}; \
missing = {'arc-relay', 'arc-agent', 'arc-client', 'arc-guard'} - names; \
assert not missing, 'plugins missing: %s' % sorted(missing)"

# A fixed non-root uid/gid, matched by runAsUser/fsGroup in the Kubernetes
# manifests (`arc agent manifest`, deploy/kubernetes/relay).
RUN groupadd --system --gid 10001 arc \
 && useradd --system --uid 10001 --gid arc --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin arc
USER 10001:10001
WORKDIR /

EXPOSE 8443
ENTRYPOINT ["twistd", "-n", "--pidfile="]
CMD ["arc-relay", "--config", "/etc/arc/relay.yaml"]
