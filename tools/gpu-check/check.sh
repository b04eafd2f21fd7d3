#!/usr/bin/env bash
# The CUDA checks, in order of value, each under its own time limit, logs in $OUT (default gpu-check-out):
#   env; the CUDA tests; the random model's step costs and decoders; with MODEL_DIR, the trained
#   model's (eager, then without cuDNN attention, a suspect of docs/gpu.md's open problems), speed
#   reports (with DATA too) and a server load test; last, the whole suite on parallel workers.
# Run from the repository root with the four packages importable. STAGES picks stages (default all):
#   STAGES="tests bench" MODEL_DIR=runs/smollm2/model bash tools/gpu-check/check.sh
# Worst cases: tests 300 s, bench 150 s, model 220 s, speed 480 s, serve 280 s, suite 420 s + the build.
set -u -o pipefail  # a stage's status is its command's, not tee's
OUT=${OUT:-gpu-check-out}
STAGES=${STAGES:-"env tests bench model speed serve suite"}
MODEL_DIR=${MODEL_DIR:-}
DATA=${DATA:-}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$OUT"

wanted() { [[ " $STAGES " == *" $1 "* ]]; }
stage() { echo; echo "=== $* ($(date +%T))"; }
status() {  # the exit status of the stage's command; 124: its time limit
    local code=$1
    if [[ $code == 124 ]]; then echo "--- exit status 124: hit its time limit"; else echo "--- exit status $code"; fi
}
quiet() { grep -v "it/s\]"; }  # drop progress bars

if wanted env; then
    stage env
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        lscpu | grep 'Model name'
        nproc
        $PYTHON -c "import torch, transformers, lightning, litserve; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'cpu', torch.backends.cpu.get_cpu_capability()); print('transformers', transformers.__version__, 'lightning', lightning.__version__, 'litserve', litserve.__version__)"
    } 2>&1 | tee "$OUT/env.log"
fi

if wanted tests; then
    stage CUDA tests
    timeout 300 $PYTHON -m pytest -q -p no:cacheprovider tests/core/test_cuda.py tests/train/test_gpu.py -rA 2>&1 \
        | tee "$OUT/cuda_tests.log" | tail -25
    status $?
fi

if wanted bench; then
    stage bench-core, random model
    timeout 150 $PYTHON -m recyclegpt.core.bench --quantize none int8 --repeats 5 2>&1 | quiet | tee "$OUT/bench_random.log"
    status $?
fi

if [[ -n "$MODEL_DIR" ]] && wanted model; then
    stage "bench-core, $MODEL_DIR"
    timeout 110 $PYTHON -m recyclegpt.core.bench --model "$MODEL_DIR" --quantize none --repeats 5 2>&1 | quiet \
        | tee "$OUT/bench_model.log"
    status $?
    stage "bench-core, $MODEL_DIR, cuDNN attention off"
    timeout 110 $PYTHON -c "import sys, torch; torch.backends.cuda.enable_cudnn_sdp(False); from recyclegpt.core.bench import main; main(sys.argv[1:])" \
        --model "$MODEL_DIR" --quantize none --repeats 5 2>&1 | quiet | tee "$OUT/bench_model_no_cudnn.log"
    status $?
fi

if [[ -n "$MODEL_DIR" && -n "$DATA" ]] && wanted speed; then
    # 11 methods x 4 prompts, a warm-up pass and one timed: about 2 minutes each on the H200 at ~60 tokens/s
    for dtype in bf16 fp32; do  # bf16: the default on a GPU; fp32: speculative exactly equal to standard
        stage "eval speed, $dtype"
        timeout 240 $PYTHON -m recyclegpt.eval.cli speed --model "$MODEL_DIR" --data "$DATA" --num-prompts 4 --repeats 1 \
            --dtype $dtype --json "$OUT/speed_$dtype.json" 2>&1 | quiet | tail -30
        status $?
    done
fi

if [[ -n "$MODEL_DIR" ]] && wanted serve; then
    stage "server load test, $MODEL_DIR"
    port=8011
    # SERVE_ARGS: e.g. "--cpu-threads 2" (docs/gpu.md, open problems 2 and 3) or "--dtype fp32"
    setsid $PYTHON -m recyclegpt.serve.cli --model "$MODEL_DIR" --port $port ${SERVE_ARGS:-} > "$OUT/serve.log" 2>&1 &
    server=$!  # its own process group: the API and worker processes go with it
    ready=no
    for _ in $(seq 90); do
        if $PYTHON -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2> /dev/null; then
            ready=yes
            break
        fi
        sleep 1
    done
    if [[ $ready == yes ]]; then
        timeout 180 $PYTHON -m recyclegpt.serve.loadtest --url http://127.0.0.1:$port --concurrency 1 8 \
            --decoding speculative standard alternating --requests 8 --max-tokens 64 --model-dir "$MODEL_DIR" 2>&1 \
            | quiet | tee "$OUT/loadtest.log"
        status $?
    else
        echo "--- the server was not ready after 90 s; its log ends:"
        tail -5 "$OUT/serve.log"
    fi
    kill -INT -- -$server 2> /dev/null
    sleep 5
    kill -KILL -- -$server 2> /dev/null
    grep "loaded on" "$OUT/serve.log"
fi

if wanted suite; then
    stage "the whole suite (the CPU kernels built first, so the workers do not queue on that build)"
    $PYTHON -c "from recyclegpt.core import cpu_kernels; cpu_kernels.build()"
    # SUITE_ARGS: e.g. --deselect tests/train/test_mlflow.py::test_run_reaches_the_mlflow_server where only mlflow-skinny is installed
    timeout -s INT 420 $PYTHON -m pytest -q -p no:cacheprovider -n 12 tests -rfE --ignore tests/serve/test_lm_eval_compat.py ${SUITE_ARGS:-} \
        2>&1 | tee "$OUT/suite.log" | tail -40
    status $?
fi
stage done
