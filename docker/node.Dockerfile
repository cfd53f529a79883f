# The node image: `cxrnode serve --no-workers`, the node-side worker
# (`cxrnode worker --queues prepare,outputs,send`) and Flower. No torch: the node never runs
# the model (the inference worker has its own image, docker/worker.Dockerfile).
#
#   docker build -f docker/node.Dockerfile -t cxrnode-node .
#
# It runs as the unprivileged user `cxrnode` (uid 10001) with DATA_DIR=/data. It is made for
# the distributed mode (BROKER_URL and DATABASE_URL set, as compose.yaml does); the embedded
# mode needs redis-server and the model runtime, which a bare-metal install has.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# dcmtk: echoscu/storescu/dcmdump for troubleshooting from inside the container;
# DejaVu Sans: the font of the Secondary Capture and the PDF.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cxrnode
COPY pyproject.toml README.md ./
COPY cxrnode ./cxrnode
COPY worker ./worker
COPY model ./model
# the node's dependencies and Flower; not the `model` extra (torch, transformers, ...)
RUN pip install ".[monitor]" \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

RUN groupadd --system --gid 10001 cxrnode \
 && useradd --system --uid 10001 --gid cxrnode --home-dir /home/cxrnode --create-home cxrnode \
 && mkdir -p /data \
 && chown cxrnode:cxrnode /data
USER cxrnode
ENV CXRNODE_DATA_DIR=/data \
    CXRNODE_HTTP_HOST=0.0.0.0
VOLUME ["/data"]
EXPOSE 11112 8080 5555
CMD ["cxrnode", "serve", "--no-workers"]
