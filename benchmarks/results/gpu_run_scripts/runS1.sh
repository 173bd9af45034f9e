#!/bin/bash
# GPU run S1 (session 7, nvidia-h200-x2).
# GPU1: the whole single-GPU suite (issue 9: test_pod_back_to_back has not run since the redesign;
#       the session-6 commits after run R are GPU-untested).
# GPU0: issue 10, 1.2B at batch 64: the matmuls alone (XLA vs torch cuBLAS, Triton on / off) and a
#       profile of the device-bound step (default, and with XLA's Triton gemms off).
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/s.log; }
(
 export CUDA_VISIBLE_DEVICES=1 MAX_JOBS=10
 timeout 560 python3 -m pytest -v -m gpu -p no:cacheprovider -rs --durations=25 tests/test_flashinfer_gpu.py tests/test_serving_gpu.py > $OUT/s1_suite.log 2>&1
 echo "suite rc $?" >> $OUT/s1_suite.log
) &
(
 export CUDA_VISIBLE_DEVICES=0
 timeout 120 python3 benchmarks/gemm_probe.py --shapes 1b 8b --batches 64 256 --reps 16 --out $OUT/gemm_default.json > $OUT/s1_gemm_default.log 2>&1; el gemm_default
 XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" timeout 90 python3 benchmarks/gemm_probe.py --shapes 1b 8b --batches 64 256 --reps 16 --no-torch --out $OUT/gemm_notriton.json > $OUT/s1_gemm_notriton.log 2>&1; el gemm_notriton
 timeout 150 python3 benchmarks/profile_step.py --shape 1b --batch 64 --steps 20 --top 60 --trace-dir $OUT/trace_1b64 > $OUT/s1_prof_1b64.log 2>&1; el prof
 XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" timeout 150 python3 benchmarks/profile_step.py --shape 1b --batch 64 --steps 20 --top 60 --trace-dir $OUT/trace_1b64_nt > $OUT/s1_prof_1b64_nt.log 2>&1; el prof_nt
) &
wait; el all
cat $OUT/s1_gemm_default.log; cut -c1-60 $OUT/s1_gemm_notriton.log
grep -h "served step\|device-bound step\|busy_us\|idle_us\|kernels_per" $OUT/s1_prof_1b64*.log
grep -E "PASSED|FAILED|ERROR|passed|failed|suite rc" $OUT/s1_suite.log | tail -8
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
