# syntax=docker/dockerfile:1
# GPU worker image for nst-bulk: the code, PyTorch with CUDA, the ImageNet VGG-19 weights, a Prefect worker.
#
#   docker build -f infra/docker/gpu-worker.Dockerfile -t nst-gpu-worker:latest .      # from the repo root
#   docker run --rm --runtime=nvidia -e NVIDIA_VISIBLE_DEVICES=0 \
#     -e PREFECT_API_URL=https://prefect.example.com/api -e PREFECT_API_AUTH_STRING \
#     -e AWS_REGION=eu-west-1 nst-gpu-worker:latest                                  # one worker per GPU
#
# The CUDA runtime comes with the PyTorch wheels (nvidia-* packages); the host needs only the NVIDIA
# driver and the NVIDIA container toolkit (`--runtime=nvidia` or `--gpus`). Used by infra/compose.yaml
# (process work pool, one container per GPU) and as the job image of the Kubernetes work pool
# (infra/k8s/base-job-template.json). Not built or run by the tests.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    TORCH_HOME=/opt/torch \
    NST_CODE_DIR=/opt/nst \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /opt/nst
COPY pyproject.toml README.md ./
COPY nst_core nst_core
COPY nst_cli nst_cli
COPY tasks tasks
COPY flows flows
COPY manifests manifests
COPY prefect.yaml prefect.yaml

# torch/torchvision as pinned in pyproject.toml, from the CUDA wheel index; the rest from PyPI.
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -e . \
 && python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Bake torchvision's ImageNet VGG-19 weights into the image: no download at run time.
RUN python -c "from torchvision.models import vgg19, VGG19_Weights; vgg19(weights=VGG19_Weights.IMAGENET1K_V1)" \
 && chmod -R a+rX /opt/torch

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin nst
USER 10001

# One worker per container, one container per GPU. The pool's flow runs are child processes of the
# worker, so they see the same single GPU (cuda:0) and the same environment (S3 credentials etc).
ENV NST_WORK_POOL=nst-gpu
CMD ["sh", "-c", "exec prefect worker start --pool \"$NST_WORK_POOL\" --type process --name \"nst-gpu-$(hostname)\" --limit 1"]
