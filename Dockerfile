# BarkGPT's CPU image: train, sample, chat and serve with the CPU build of PyTorch.
#
#   make docker                                   # barkgpt:latest (see the README's Deploy section)
#   docker run --rm -p 8000:8000 -v barkgpt-runs:/runs barkgpt   # serve /runs/bark on port 8000
#
# Build args: BASE_IMAGE (a Python 3.11+ image with venv; default the official slim one),
# TORCH (the PyTorch requirement), TORCH_INDEX (where it comes from: PyTorch's CPU wheels),
# WHEELHOUSE (a folder in the build context; with wheels in it, made by docker/wheelhouse.sh,
# the build installs only from them and needs no network).
ARG BASE_IMAGE=python:3.11-slim

# requirements: barkgpt's runtime requirements, read from pyproject.toml (so a change to its dev
# extra or tool settings leaves the next layer alone).
FROM ${BASE_IMAGE} AS requirements
COPY docker/build.sh pyproject.toml /tmp/build/
RUN sh /tmp/build/build.sh requirements /tmp/build/pyproject.toml /tmp/build/requirements.txt

# deps: a venv with PyTorch and barkgpt's dependencies. It depends on the requirements and the
# wheelhouse only, so a change to the source reuses this layer.
FROM ${BASE_IMAGE} AS deps
ARG WHEELHOUSE=docker/wheelhouse
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY ${WHEELHOUSE}/ /wheelhouse/
COPY docker/build.sh /tmp/build/
COPY --from=requirements /tmp/build/requirements.txt /tmp/build/
RUN sh /tmp/build/build.sh deps /opt/barkgpt /tmp/build/requirements.txt

# builder: the barkgpt wheel, from the source.
FROM deps AS builder
COPY pyproject.toml README.md /src/
COPY barkgpt /src/barkgpt
RUN sh /tmp/build/build.sh wheel /opt/barkgpt /src /dist

# The image: the deps venv (a cached layer), barkgpt on top, a non-root user.
FROM ${BASE_IMAGE}
ENV PATH=/opt/barkgpt/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    MPLCONFIGDIR=/tmp/matplotlib
RUN useradd --create-home --uid 1000 barkgpt && mkdir /runs && chown barkgpt:barkgpt /runs
COPY --from=deps /opt/barkgpt /opt/barkgpt
COPY docker/healthcheck.py /opt/barkgpt/healthcheck.py
COPY --from=builder /dist/ /tmp/dist/
RUN pip install --no-deps --no-index /tmp/dist/*.whl && rm -r /tmp/dist
USER barkgpt
# Relative run folders (the presets' runs/x) land in the /runs volume.
WORKDIR /
VOLUME /runs
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/opt/barkgpt/healthcheck.py"]
ENTRYPOINT ["barkgpt"]
# 0.0.0.0: reachable through `docker run -p 8000:8000`; Host names other than localhost and
# 127.0.0.1 (a reverse proxy's) need --allowed-host. Running requests get 8 s after `docker stop`
# (SIGTERM), inside Docker's default 10 s grace period.
CMD ["serve", "--model", "/runs/bark", "--host", "0.0.0.0", "--port", "8000", "--shutdown-timeout", "8"]
