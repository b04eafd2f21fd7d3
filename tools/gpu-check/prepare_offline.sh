#!/usr/bin/env bash
# Prepare, on a machine with network, what tools/gpu-check/check.sh needs on a GPU machine without it
# that has torch, transformers and lightning already (docs/gpu.md): wheels of the rest, and a trained
# SmolLM2 module with its GGUF base, cut into parts of at most PART_BYTES for transfers with a size limit.
#   bash tools/gpu-check/prepare_offline.sh [MODEL_DIR] [GGUF] [DATA]
# writes .gpu-transfer/{wheels,gguf-1,gguf-2,model} (git ignores it through .git/info/exclude).
set -eu
MODEL_DIR=${1:-runs/smollm2/model}
GGUF=${2:-$(python -c "from recyclegpt.core.assets import smollm2_gguf_path; print(smollm2_gguf_path())")}
DATA=${3:-../shared/data/tinystories_valid_sample.txt}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}  # the GPU machine's Python
PART_BYTES=${PART_BYTES:-36000000}       # the first GGUF part travels beside the wheels
OUT=.gpu-transfer
# What the lent image lacked on 2026-12-04 (it had torch, transformers, lightning, torchmetrics, pytest
# and pytest-xdist). mlflow-skinny stands in for mlflow, whose UI alone is 11.7 MB.
PACKAGES="litserve fastapi starlette uvicorn httptools websockets watchfiles python-dotenv pydantic pydantic-core
annotated-types typing-inspection jsonargparse docstring-parser typeshed-client mlflow-skinny mlflow-tracing
sqlalchemy alembic mako sqlparse databricks-sdk google-auth cryptography cffi pycparser pyasn1 pyasn1-modules
cachetools gitpython gitdb smmap importlib-metadata zipp opentelemetry-api opentelemetry-sdk opentelemetry-proto
opentelemetry-semantic-conventions openai jiter sniffio pyzmq gguf platformdirs prettytable wcwidth httpx2 httpcore2"

grep -qx "/$OUT/" .git/info/exclude || echo "/$OUT/" >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT"/{wheels,gguf-1,gguf-2,model}
pins=$(pip list --format=freeze | python -c "
import re, sys
wanted = {re.sub(r'[-_.]+', '-', n).lower() for n in sys.argv[1].split()}
print(' '.join(l.strip() for l in sys.stdin if re.sub(r'[-_.]+', '-', l.split('==')[0]).lower() in wanted))" "$PACKAGES")
platforms=""
for n in 17 24 26 27 28 31 34 35; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 $platforms -d "$OUT/wheels" $pins
head -c "$PART_BYTES" "$GGUF" > "$OUT/gguf-1/part"
tail -c +"$((PART_BYTES + 1))" "$GGUF" > "$OUT/gguf-2/part"
sha256sum < "$GGUF" | cut -d' ' -f1 > "$OUT/model/gguf.sha256"
python tools/gpu-check/module_transfer.py split "$MODEL_DIR" "$OUT/model"
cp "$DATA" "$OUT/model/data.txt"
du -sh "$OUT"/*
