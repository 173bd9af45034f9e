#!/bin/bash
# GPU run S3 (session 7, nvidia-h200-x2).
# Phase 1. GPU0: issue 10's figure: the 1.2B shape at batch 64 / 256, K=4, beside torch +
#   FlashInfer eager / CUDA graph on the same weights (timing now >= 6 programs a repeat, prompts
#   centred on ctx; the argmax's own kernel). GPU1: the engine's GPU tests (issue 9 / 10).
# Phase 2 (both GPUs): the tensor-parallel GPU test (issue 13), and the 2-GPU step with no XLA
#   command buffers (every kernel its own launch: is the host cheaper than 67 graph launches?).
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/s.log; }
(
 export CUDA_VISIBLE_DEVICES=1 MAX_JOBS=8
 timeout 300 python3 -m pytest -v -m gpu -p no:cacheprovider -rs --durations=10 tests/test_serving_gpu.py > $OUT/s3_serving_gpu.log 2>&1
 echo "serving gpu rc $?" >> $OUT/s3_serving_gpu.log; el serving_gpu
) &
(
 export CUDA_VISIBLE_DEVICES=0
 timeout 300 python3 benchmarks/serve_bench.py decode --shapes 1b --batches 64 256 --steps 24 --decode-steps 4 --out $OUT/sb1b > $OUT/s3_1b.log 2>&1; el sb1b
) &
wait; el phase1
timeout 110 python3 -m pytest -v -m gpu -p no:cacheprovider -rs tests/test_tp_gpu.py > $OUT/s3_tp_test.log 2>&1; echo "tp test rc $?" >> $OUT/s3_tp_test.log; el tp_test
XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout 100 python3 benchmarks/tp_bench.py --gpus 2 --batches 64 --ctx 1024 --steps 30 > $OUT/s3_tp2_nocb.log 2>&1; el tp2_nocb
grep -h -A4 "^decode step" $OUT/s3_1b.log
grep -E "PASSED|FAILED|ERROR|passed|failed|rc " $OUT/s3_serving_gpu.log $OUT/s3_tp_test.log | tail -14 | cut -c1-160
grep -h -A3 "^GPUs" $OUT/s3_tp2_nocb.log; grep -h "warm-up\|prefill of" $OUT/s3_tp2_nocb.log
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
