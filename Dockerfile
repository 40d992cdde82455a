# hilum worker image for GPU clusters (A100/H100): Ray head and workers, KubeRay pods, or a plain
# `docker run --gpus all`. Build:  docker build -t hilum:latest .
# CPU-only image (laptops, CI):    docker build --build-arg BASE=ubuntu:22.04 --build-arg TORCH_ARCH= -t hilum:cpu .
#
# The CUDA *devel* image carries nvcc, so DeepSpeed's GPU ops are compiled here, once, instead of
# by every worker at start (JIT builds of fused Adam take minutes and need a compiler on the node).
ARG BASE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${BASE}

# Compute capabilities the prebuilt ops cover: 8.0 = A100, 9.0 = H100/H200. Empty: skip GPU ops.
ARG TORCH_ARCH="8.0;9.0"
ARG PYTHON=3.11

# g++/make/ninja: DeepSpeed builds its ops (and JIT-builds its CPU communication op on CPU nodes);
# libibverbs/rdma-core: NCCL's InfiniBand/RoCE transport between nodes.
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl g++ make ninja-build git libibverbs1 rdma-core \
    && rm -rf /var/lib/apt/lists/*

# A managed Python from uv, so the image does not depend on the base distribution's Python.
COPY --from=ghcr.io/astral-sh/uv:0.8 /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN uv python install ${PYTHON} && uv venv --python ${PYTHON} /opt/venv

WORKDIR /opt/hilum
# Dependencies first, exactly the set CI tested (requirements.lock: every package at one version;
# a layer that survives code changes), then hilum itself, which resolves nothing of its own.
COPY requirements.lock ./
RUN uv pip install --no-cache -r requirements.lock
COPY pyproject.toml README.md ./
COPY launch launch
COPY cluster cluster
COPY trainer trainer
COPY kernels kernels
COPY monitoring monitoring
COPY configs configs
RUN uv pip install --no-cache --no-deps --no-build-isolation .

# DeepSpeed's ops, prebuilt against the torch just installed: fused Adam and the ZeRO/GPU
# communication helpers for the architectures above; the CPU Adam for ZeRO-Offload. The same
# DeepSpeed release as the lock's, rebuilt from source with its ops.
RUN if [ -n "${TORCH_ARCH}" ]; then \
        TORCH_CUDA_ARCH_LIST="${TORCH_ARCH}" DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
        uv pip install --no-cache --no-build-isolation --reinstall --no-deps "$(grep -m1 '^deepspeed==' requirements.lock)" \
        && python -m deepspeed.env_report; \
    fi

# NCCL between nodes. Defaults that suit InfiniBand clusters; override per cluster at run time:
#   NCCL_SOCKET_IFNAME  the interface for NCCL's bootstrap and socket fallback (eth0, ens*, ...)
#   NCCL_IB_HCA         which HCAs to use (e.g. mlx5); unset lets NCCL pick every active one
#   NCCL_IB_DISABLE=1   on Ethernet-only clusters (TCP sockets; expect lower all-reduce bandwidth)
#   NCCL_DEBUG=INFO     prints the chosen transport (NET/IB vs NET/Socket) at the first collective
#   NCCL_ASYNC_ERROR_HANDLING=1 (TORCH_NCCL_ASYNC_ERROR_HANDLING): a rank whose peer died raises
#                       instead of hanging, so Ray Train's FailureConfig can restart the group
ENV NCCL_SOCKET_IFNAME=^lo,docker0 \
    NCCL_DEBUG=WARN \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# Prometheus metrics (rank r on a node: 9400 + local rank). They listen on 127.0.0.1 unless
# monitoring.metrics_host says otherwise (0.0.0.0 inside a pod network, for example).
EXPOSE 9400-9407
# Ray's ports, for a head node: GCS, Ray Client, dashboard / job API.
EXPOSE 6379 10001 8265

# Running the image alone trains the embedded default on generated data (CPU or one GPU).
CMD ["sh", "-c", "hilum shards phantom --out data/phantom && hilum train --config configs/tiny-clip.yaml"]
