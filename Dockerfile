# The rootfs of the vxnet managed plugin: Debian bookworm, python3, etcd (the embedded store), the plugin's
# Python dependencies and its code in /opt/vxnet. A managed plugin is this rootfs plus config.json (beside this file):
#
#   scripts/build-plugin.sh           # builds this, exports the rootfs to build/plugin/, docker plugin create + enable
#
# By hand, with Docker Hub, Debian's mirror and PyPI reachable from builds:
#
#   DOCKER_BUILDKIT=0 docker build -t vxnet-plugin-rootfs .
#   mkdir -p build/plugin/rootfs && cp config.json build/plugin/
#   docker export "$(docker create vxnet-plugin-rootfs)" | tar -x -C build/plugin/rootfs
#   docker plugin create vxnet:latest build/plugin && docker plugin enable vxnet:latest
#
# Offline (no Docker Hub, nothing reachable from inside builds), scripts/build-plugin.sh passes BASE= an image
# it made with debootstrap that already holds the Debian packages, and puts wheels downloaded beforehand in
# build/plugin-wheels/ (pip itself among them): then no step below touches the network.
# Only syntax the legacy builder knows (docker.io 20.10 has no buildx).

ARG BASE=debian:bookworm-slim

# --- the OS, trimmed ---------------------------------------------------------------------------------------------
FROM ${BASE} AS os
# etcd-server: the embedded store (ETCD_ENDPOINTS empty). Installed only if the base lacks a package.
ARG APT_PACKAGES="python3 etcd-server nftables netbase"
# policy-rc.d: no package may start its service (etcd-server's would) inside a build.
RUN set -eu; \
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; \
    missing=""; \
    for p in $APT_PACKAGES; do \
      dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -qx 'install ok installed' || missing="$missing $p"; \
    done; \
    if [ -n "$missing" ]; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing; \
    fi; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/* /usr/share/man/* /usr/share/info/* \
      /usr/share/locale/* /usr/share/lintian /usr/share/bug; \
    find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete; \
    find /usr/share/doc -mindepth 1 -type d -empty -delete

# --- Python dependencies: from the wheels in the context when there are any, else from PyPI ----------------------
FROM os AS pydeps
# wheel[s]: optional (a pattern that matches nothing is no error), its files land beside the requirements.
COPY scripts/plugin-requirements.txt build/plugin-wheel[s] /tmp/deps/
RUN set -eu; \
    if ls /tmp/deps/pip-*.whl >/dev/null 2>&1; then \
      pip="python3 $(ls /tmp/deps/pip-*.whl | head -n 1)/pip"; source="--no-index --find-links /tmp/deps"; \
    else \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip; \
      pip="python3 -m pip"; source=""; \
    fi; \
    $pip install --root /staging --break-system-packages --no-cache-dir --no-warn-script-location \
      --disable-pip-version-check $source -r /tmp/deps/plugin-requirements.txt; \
    rm -rf /staging/usr/local/bin

# --- the plugin ----------------------------------------------------------------------------------------------------
FROM os
COPY --from=pydeps /staging/usr/local/lib/ /usr/local/lib/
WORKDIR /opt/vxnet
# The packages of pyproject.toml's [tool.setuptools] packages.
COPY plugin/ plugin/
COPY netdriver/ netdriver/
COPY ipam_driver/ ipam_driver/
COPY encrypt/ encrypt/
COPY kernel/ kernel/
COPY store/ store/
COPY wire/ wire/
COPY telemetry/ telemetry/
COPY cli/ cli/
# /host/run: the host's /run (config.json Mounts); /var/lib/vxnet: the propagated mount (state).
RUN python3 -m compileall -q /opt/vxnet && mkdir -p /run/docker/plugins /var/lib/vxnet /host/run
# For `docker run`/`docker create` of this image; the plugin itself starts from config.json's Entrypoint.
ENTRYPOINT ["python3", "-m", "plugin"]
