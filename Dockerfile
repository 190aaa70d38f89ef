# The serving image: the promoted model baked in, served by `python -m posttrain.serving.serve` (transformers' OpenAI-compatible
# server) as a non-root user. Build it with `make image` (MODEL=models/export or models:/<name>@<alias>), which first
# writes the resolved model folder to .image-model.tmp/ and afterwards smoke-tests the container (docs/serving.md):
#
#   make image                                               # -> llm-lifecycle-serve:latest
#   docker run --rm -p 127.0.0.1:8000:8000 llm-lifecycle-serve
#   docker run --rm -p 127.0.0.1:8000:8000 llm-lifecycle-serve --continuous-batching   # extra flags are appended
#
# Only what serving needs is installed (not the pipeline's dvc, prefect, mlflow, gradio, ...), at the versions
# pyproject.toml pins and the `serve` extra adds (tests/test_serve.py checks they agree). torch comes from PyTorch's
# CPU index; for a GPU image pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 and run with
# --gpus all ... --device cuda.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG MODEL_DIR=.image-model.tmp

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_UPDATE_CHECK=1

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0 \
 && pip install --no-cache-dir \
        "transformers[serving]==5.23.0" \
        tokenizers==0.23.3 \
        accelerate==1.15.0 \
        fastapi==0.150.0 \
        openai==3.57.0 \
        uvicorn==0.55.0 \
        pyyaml==6.0.4 \
 && groupadd --gid 10001 serve \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin serve

WORKDIR /app
COPY posttrain/ /app/posttrain/
COPY ${MODEL_DIR}/ /models/export/

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "posttrain.serving.serve", "--model", "/models/export", "--host", "0.0.0.0", "--port", "8000"]
