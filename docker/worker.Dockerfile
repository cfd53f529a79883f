# The inference worker image: `cxrnode worker --queues infer` on a GPU host. It needs only the
# broker (no database, no shared disk, no DICOM network) and a CXR-LLaVA v2 checkpoint
# mounted read-only (CXRNODE_MODEL).
#
#   docker build -f docker/worker.Dockerfile -t cxrnode-worker .
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# torch 2.13.0 comes from PyPI by default, whose Linux wheels are CUDA builds that bring their
# CUDA libraries as pip packages: the host needs only the NVIDIA driver and the NVIDIA
# Container Toolkit. TORCH_INDEX picks another build (a given CUDA version, or the CPU one).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_INDEX=""
RUN pip install "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}

WORKDIR /opt/cxrnode
COPY pyproject.toml README.md ./
COPY cxrnode ./cxrnode
COPY worker ./worker
COPY model ./model
# the model runtime and int8/int4 weights (torchao declares no torch requirement, so the
# torch installed above stays)
RUN pip install ".[model,quant]"

RUN groupadd --system --gid 10001 cxrnode \
 && useradd --system --uid 10001 --gid cxrnode --home-dir /home/cxrnode --create-home cxrnode
USER cxrnode
# A hub id in CXRNODE_MODEL would download into this cache; a mounted directory needs none.
ENV HF_HOME=/home/cxrnode/.cache/huggingface \
    CXRNODE_MODEL=/models/cxr-llava
CMD ["cxrnode", "worker", "--queues", "infer"]
