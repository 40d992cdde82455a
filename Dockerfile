# hilum worker image. CPU by default; on GPU nodes the same image runs with the CUDA build of
# torch that torch==2.14.1 installs (it carries its CUDA libraries).
FROM python:3.11-slim

# g++ and ninja: DeepSpeed JIT-builds its CPU communication op when a worker starts.
RUN apt-get update && apt-get install -y --no-install-recommends g++ make && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/hilum
COPY pyproject.toml README.md ./
COPY launch launch
COPY cluster cluster
COPY trainer trainer
COPY kernels kernels
COPY monitoring monitoring
COPY configs configs
RUN pip install --no-cache-dir .

ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# Metrics listen on 127.0.0.1 unless monitoring.metrics_host says otherwise.
EXPOSE 9400
CMD ["sh", "-c", "hilum shards phantom --out data/phantom && hilum train --config configs/tiny-clip.yaml"]
