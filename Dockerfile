# cxrnode image: the node, its node-side workers and (with a CUDA torch) GPU workers.
#   docker build -t cxrnode .                                   # CPU torch
#   docker build -t cxrnode-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cxrnode
COPY pyproject.toml README.md ./
COPY cxrnode ./cxrnode
COPY worker ./worker
COPY model ./model
RUN pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX" \
 && pip install --no-cache-dir .

RUN useradd --system --create-home cxrnode && mkdir -p /data && chown cxrnode /data
USER cxrnode
ENV CXRNODE_DATA_DIR=/data
EXPOSE 11112 8080
CMD ["cxrnode", "serve"]
