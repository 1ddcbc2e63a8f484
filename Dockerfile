# replicad in a container: `docker build -t replicad .` (docs/operations.md §7).
# BASE_IMAGE: any Debian-like image with Python >= 3.11 and its venv module. Where no
# registry is reachable, `docker/build-base.sh` builds one locally (debootstrap).
# Wheels in dist/wheels (`pip wheel . -w dist/wheels`) are installed offline if present;
# otherwise the build installs from PyPI.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
COPY . /src
RUN python3 -m venv /opt/replicad \
 && if ls /src/dist/wheels/replicad-*.whl >/dev/null 2>&1; then \
        /opt/replicad/bin/pip install --no-cache-dir --no-index --find-links /src/dist/wheels replicad; \
    else \
        /opt/replicad/bin/pip install --no-cache-dir /src; \
    fi \
 && /opt/replicad/bin/replicad --version

FROM ${BASE_IMAGE}
RUN (command -v useradd >/dev/null && useradd --system --uid 10001 --user-group --home-dir /var/lib/replicad \
        --shell /usr/sbin/nologin replicad || adduser -S -u 10001 -h /var/lib/replicad replicad) \
 && mkdir -p /var/lib/replicad /etc/replicad /run/replicad /srv/vms \
 && chown replicad /var/lib/replicad /run/replicad /srv/vms
COPY --from=build /opt/replicad /opt/replicad
ENV PATH=/opt/replicad/bin:$PATH \
    REPLICAD_CONFIG=/etc/replicad/replicad.yaml
USER replicad
WORKDIR /var/lib/replicad
VOLUME ["/var/lib/replicad"]
# token (Kerberos-style) auth, certificate auth, Prometheus metrics
EXPOSE 80 443 9180
HEALTHCHECK --interval=5s --timeout=5s --start-period=10s --retries=3 \
    CMD ["replicad", "server", "get", "-o", "json"]
ENTRYPOINT ["replicad"]
CMD ["daemon", "--config", "/etc/replicad/replicad.yaml"]
