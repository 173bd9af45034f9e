#!/bin/bash
# GPU run Q (session 6, nvidia-h200-x2).
# Phase 1 (both GPUs): 8B TP at batch 64 with K=4 decode steps per dispatch (1 and 2 GPUs), and on
# 2 GPUs with all-reduces inside XLA's command buffers (COLLECTIVES, synchronous), K=1 traced and K=4.
# Phase 2: GPU0 the decode-kernel probe + the small shape's step per decode kernel;
# GPU1 the 9 GPU tests runs M / N did not reach (issue 9).
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1 MAX_JOBS=16
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/q.log; }
TP="benchmarks/tp_bench.py --batches 64 --ctx 1024 --steps 24"
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES --xla_gpu_graph_min_graph_size=1 --xla_gpu_disable_async_collectives=ALLREDUCE"
timeout 140 python3 $TP --gpus 1 2 --decode-steps 4 --out $OUT/tpk4 > $OUT/q_tp_k4.log 2>&1; el tp_k4
XLA_FLAGS="$CB" timeout 80 python3 $TP --gpus 2 --decode-steps 1 --trace-dir $OUT/trace_col > $OUT/q_tp_col_k1.log 2>&1; el tp_col_k1
XLA_FLAGS="$CB" timeout 80 python3 $TP --gpus 2 --decode-steps 4 > $OUT/q_tp_col_k4.log 2>&1; el tp_col_k4
F=tests/test_flashinfer_gpu.py
(
 export CUDA_VISIBLE_DEVICES=0
 timeout 100 python3 benchmarks/decode_kernel_probe.py --json $OUT/probe.json > $OUT/q_probe.log 2>&1
 timeout 90 python3 benchmarks/serve_bench.py decode --shapes small --batches 256 --steps 24 --decode-steps 4 --decode-kernel auto cuda_core --no-torch --out $OUT/sb > $OUT/q_small.log 2>&1
 timeout 50 python3 benchmarks/serve_bench.py decode --shapes small --batches 64 --steps 24 --decode-steps 1 --no-torch --out $OUT/sb64 > $OUT/q_small64.log 2>&1
) &
(
 export CUDA_VISIBLE_DEVICES=1
 timeout 245 python3 -m pytest -v -m gpu -p no:cacheprovider -rs "$F::test_host_plans_of_chunked_prefill_steps" $F::test_static_host_plans_over_decode_steps $F::test_static_host_plans_of_chunked_prefill_steps $F::test_pod $F::test_pod_back_to_back > $OUT/q_suite.log 2>&1
 echo "suite rc $?" >> $OUT/q_suite.log
) &
wait; el phase2
grep -h -A4 "^GPUs" $OUT/q_tp_k4.log $OUT/q_tp_col_k1.log $OUT/q_tp_col_k4.log
grep -h "trace (per" $OUT/q_tp_col_k1.log | cut -c1-700
grep -h -A8 "^shape " $OUT/q_probe.log; grep -h -A10 "^decode step" $OUT/q_small.log $OUT/q_small64.log
grep -E "PASSED|FAILED|ERROR|passed|failed|suite rc" $OUT/q_suite.log | tail -15
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
