# wakeproxy as one container next to the services it sleeps and wakes.
#   ./dev image       (offline: makes a local Python base when python:3.12-slim cannot be pulled)
#   docker build -t wakeproxy .            (BASE_IMAGE: any Debian-like Python 3.11+ image)
#   docker run --network host -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -v ./config.yaml:/etc/wakeproxy/config.yaml:ro wakeproxy
ARG BASE_IMAGE=python:3.12-slim

# Build stage: wheels for wakeproxy and every dependency (no compiler needed: all ship
# manylinux wheels), so the runtime stage installs offline and carries no build tools.
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY wakeproxy ./wakeproxy
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE_IMAGE}
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links=/wheels wakeproxy \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin wakeproxy \
    && install -d -o wakeproxy -g wakeproxy /var/lib/wakeproxy
# The learned prediction tables (prediction.state_file): mount a volume to keep them.
VOLUME /var/lib/wakeproxy
# Not root: access to the Docker socket comes from its group (--group-add, see README).
USER wakeproxy
ENV WAKEPROXY_CONFIG=/etc/wakeproxy/config.yaml \
    PYTHONUNBUFFERED=1
# Docker 20.10 runs the first check only after one interval: keep it short. The admin
# address comes from the config's admin.listen ($WAKEPROXY_ADMIN overrides it).
HEALTHCHECK --interval=2s --timeout=2s --start-period=2s --retries=3 \
    CMD ["wakeproxy", "health"]
ENTRYPOINT ["wakeproxy"]
CMD ["run"]
