#!/bin/bash
# GPU run S2 (session 7, nvidia-h200-x2).
# Phase 1. GPU1: the rest of the single-GPU suite (from the test fixed after S1) + the engine's
#   GPU tests (issue 9; the session-6 engine commits). GPU0: issue 10, 1.2B batch 64: K=4 profile
#   (why K=4's device-bound step is slower than K=1's), and served / device-bound at K=1, 4.
# Phase 2 (both GPUs): the tensor-parallel GPU test; the 2-GPU step without XLA command buffers.
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/s.log; }
F=tests/test_flashinfer_gpu.py
if [ -z "$ONE" ]; then export CUDA_VISIBLE_DEVICES=1; fi
(
 export MAX_JOBS=16
 timeout 270 python3 -m pytest -v -m gpu -p no:cacheprovider -rs --durations=15 $F::test_decode_step_in_one_jit_copies_no_page $F::test_decode_steps_with_host_plans $F::test_host_plan_mismatch_is_flagged_and_the_queue_recovers $F::test_host_plans_of_chunked_prefill_steps $F::test_static_host_plans_over_decode_steps $F::test_static_host_plans_without_the_kv_split_at_a_full_batch $F::test_static_host_plans_of_chunked_prefill_steps tests/test_serving_gpu.py > $OUT/s2_suite.log 2>&1
 echo "suite rc $?" >> $OUT/s2_suite.log; el suite
) &
[ -n "$ONE" ] && wait
(
 if [ -z "$ONE" ]; then export CUDA_VISIBLE_DEVICES=0; fi
 timeout 125 python3 benchmarks/profile_step.py --shape 1b --batch 64 --steps 20 --decode-steps 4 --top 40 --trace-dir $OUT/trace_1b64_k4 > $OUT/s2_prof_1b64_k4.log 2>&1; el prof_k4
 timeout 160 python3 benchmarks/serve_bench.py decode --shapes 1b --batches 64 --steps 24 --decode-steps 1 4 --no-torch --out $OUT/sb1b64 > $OUT/s2_1b64.log 2>&1; el sb1b64
) &
wait; el phase1
[ -z "$ONE" ] && timeout 120 python3 -m pytest -v -m gpu -p no:cacheprovider -rs tests/test_tp_gpu.py > $OUT/s2_tp_test.log 2>&1; echo "tp test rc $?" >> $OUT/s2_tp_test.log; el tp_test
[ -z "$ONE" ] && XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout 110 python3 benchmarks/tp_bench.py --gpus 2 --batches 64 --ctx 1024 --steps 30 --trace-dir $OUT/trace_tp2_nocb > $OUT/s2_tp2_nocb.log 2>&1; el tp2_nocb
grep -h "device-bound step\|busy_us\|idle_us\|kernels_per" $OUT/s2_prof_1b64_k4.log
grep -h -A4 "^decode step" $OUT/s2_1b64.log
grep -E "PASSED|FAILED|ERROR|passed|failed|rc " $OUT/s2_suite.log $OUT/s2_tp_test.log | tail -40 | cut -c1-160
grep -h -A3 "^GPUs" $OUT/s2_tp2_nocb.log; grep -h "each GPU" $OUT/s2_tp2_nocb.log | cut -c1-1500; grep -h "device_bound_ms" $OUT/s2_tp2_nocb.log | cut -c1-300
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
