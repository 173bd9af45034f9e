#!/bin/bash
# GPU run R (session 6, nvidia-h200-x2), after the unsplit CUDA-graph decode plans.
# Phase 1 (both GPUs): 8B TP batch 64, K=4 decode steps per dispatch: 1 GPU, 2 GPUs, and 2 GPUs
# with all-reduces in XLA's command buffers (COLLECTIVES, synchronous).
# Phase 2: GPU0 the 1.2B shape at 64 / 256 (K=4) beside torch + FlashInfer eager / CUDA graph;
# GPU1 the POD tests not reached in run Q + the static decode-plan tests (unsplit plans).
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1 MAX_JOBS=16
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/r.log; }
TP="benchmarks/tp_bench.py --batches 64 --ctx 1024 --steps 24 --decode-steps 4"
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES --xla_gpu_graph_min_graph_size=1 --xla_gpu_disable_async_collectives=ALLREDUCE"
timeout 110 python3 $TP --gpus 1 --out $OUT/tp1 > $OUT/r_tp1_k4.log 2>&1; el tp1_k4
timeout 110 python3 $TP --gpus 2 --out $OUT/tp2 > $OUT/r_tp2_k4.log 2>&1; el tp2_k4
XLA_FLAGS="$CB" timeout 110 python3 $TP --gpus 2 --out $OUT/tp2col > $OUT/r_tp2_col_k4.log 2>&1; el tp2_col_k4
F=tests/test_flashinfer_gpu.py
(
 export CUDA_VISIBLE_DEVICES=0
 timeout 235 python3 benchmarks/serve_bench.py decode --shapes 1b --batches 64 256 --steps 24 --decode-steps 4 --out $OUT/sb1b > $OUT/r_1b.log 2>&1
) &
(
 export CUDA_VISIBLE_DEVICES=1
 timeout 235 python3 -m pytest -v -m gpu -p no:cacheprovider -rs $F::test_static_host_plans_without_the_kv_split_at_a_full_batch $F::test_static_host_plans_over_decode_steps $F::test_pod $F::test_pod_back_to_back > $OUT/r_suite.log 2>&1
 echo "suite rc $?" >> $OUT/r_suite.log
) &
wait; el phase2
for f in $OUT/r_tp*.log; do echo "-- $f"; grep -h "warm-up\|prefill of" $f; grep -h -A3 "^GPUs" $f; done
grep -h -A6 "^decode step" $OUT/r_1b.log
grep -E "PASSED|FAILED|ERROR|passed|failed|suite rc" $OUT/r_suite.log | tail -12
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
