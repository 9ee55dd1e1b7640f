# One image for the draft service, the target service and the orchestrator; compose.yaml picks
# the command. Weights are not in the image: the `models` service fetches them into a volume.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SPECDEC_CACHE=/models

WORKDIR /app

# torch first and pinned, from PyTorch's CPU index: an unpinned torch from PyPI is a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY protos protos
COPY specdec specdec
COPY draft_service draft_service
COPY target_service target_service
COPY orchestrator orchestrator
RUN pip install .

# Non-root, and the models volume mount point owned by that user.
RUN useradd --create-home specdec && mkdir -p /models && chown specdec /models
USER specdec
