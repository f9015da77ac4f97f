# fedsynth site image: Flower SuperNode + the trusted launcher, installed offline.
#
# Build context: the agreed release tree (the directory the coordinator submits with
# `flwr run`, e.g. unpacked from `git archive`; no .venv, no wheelhouse inside it).
# The wheelhouse (pip download, docs/hospital-it.md) comes in as a second context, with
# its requirements.lock (deploy/wheelhouse.py lock): every dependency is hash-checked.
#   docker build -f deploy/site.Dockerfile --build-context wheelhouse=/srv/wheelhouse \
#     -t fedsynth-site:0.1.0 /srv/release/fedsynth-0.1.0
# Nothing is fetched from the internet during the build (pip --no-index) or at run time.
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
    TOKENIZERS_PARALLELISM=false \
    FEDSYNTH_INSTALL_DIR=/opt/fedsynth \
    FEDSYNTH_PYTHON=/opt/fedsynth/.venv/bin/python \
    PATH=/opt/fedsynth/.venv/bin:$PATH

RUN groupadd --system --gid 10001 fedsynth \
    && useradd --system --uid 10001 --gid fedsynth --home-dir /srv/site --shell /usr/sbin/nologin fedsynth

COPY --chown=root:root . /opt/fedsynth
# Dependencies (torch with CUDA included: its wheels carry the CUDA runtime; the host
# needs only the NVIDIA driver and the NVIDIA container toolkit).
RUN --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    python -m venv /opt/fedsynth/.venv \
    && /opt/fedsynth/.venv/bin/pip install --no-index --find-links /wheelhouse \
        --require-hashes -r /wheelhouse/requirements.lock \
    && /opt/fedsynth/.venv/bin/pip install --no-index --find-links /wheelhouse --no-deps \
        --no-build-isolation /opt/fedsynth \
    && /opt/fedsynth/.venv/bin/pip check \
    && chmod 0755 /opt/fedsynth/deploy/site.sh

# The pin of this image's release: compare its sha256 with the consortium's out of band
# (docker run --rm --entrypoint cat fedsynth-site:0.1.0 /etc/fedsynth/pin.json).
RUN mkdir -p /etc/fedsynth \
    && cd /opt/fedsynth && .venv/bin/python -m client.launcher pin /opt/fedsynth --out /etc/fedsynth/pin.json \
    && cat /etc/fedsynth/pin.json

USER fedsynth
WORKDIR /opt/fedsynth
# /srv/site: data (notes, output, ledger), pki, keys, models, cache; mount it.
VOLUME ["/srv/site"]
ENTRYPOINT ["/opt/fedsynth/deploy/site.sh"]
