# slowmo-train on an official PyTorch CUDA image (NCCL backend on GPUs, gloo on CPU).
#   docker build -t slowmo-train .
#   docker run --gpus all --shm-size=8g -v /data/cifar10:/data/cifar10 slowmo-train \
#       task=cifar10 data.root=/data/cifar10 launcher.nproc_per_node=8
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/slowmo-train
COPY pyproject.toml README.md ./
COPY slowmo_train ./slowmo_train
COPY configs ./configs
RUN pip install --no-cache-dir . && rm -rf /root/.cache/pip

WORKDIR /workspace
ENTRYPOINT ["slowmo-train"]
