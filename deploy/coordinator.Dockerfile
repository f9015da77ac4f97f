# fedsynth coordinator image: Flower SuperLink (+ the ServerApp processes it starts) and
# the flwr CLI, installed offline.
#
# Build context: the agreed release tree (see deploy/site.Dockerfile); the wheelhouse is
# a second build context (a CPU-only torch is enough here: the coordinator never trains):
#   docker build -f deploy/coordinator.Dockerfile --build-context wheelhouse=/srv/wheelhouse \
#     -t fedsynth-coordinator:0.1.0 /srv/release/fedsynth-0.1.0
FROM python:3.11-slim-bookworm

ENV PIP_NO_INDEX=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    PATH=/opt/fedsynth/.venv/bin:$PATH

RUN groupadd --system --gid 10001 fedsynth \
    && useradd --system --uid 10001 --gid fedsynth --home-dir /srv/fedsynth --shell /usr/sbin/nologin fedsynth

COPY --chown=root:root . /opt/fedsynth
RUN --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    python -m venv /opt/fedsynth/.venv \
    && /opt/fedsynth/.venv/bin/pip install --no-index --find-links /wheelhouse \
        --require-hashes -r /wheelhouse/requirements.lock \
    && /opt/fedsynth/.venv/bin/pip install --no-index --find-links /wheelhouse --no-deps \
        --no-build-isolation /opt/fedsynth \
    && /opt/fedsynth/.venv/bin/pip check \
    && chmod 0755 /opt/fedsynth/deploy/coordinator.sh

USER fedsynth
WORKDIR /opt/fedsynth
# /srv/fedsynth: pki (server cert + key; ca.key stays offline), state.db, runs, flwr home.
VOLUME ["/srv/fedsynth"]
ENTRYPOINT ["/opt/fedsynth/deploy/coordinator.sh"]
