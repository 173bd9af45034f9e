#!/bin/bash
# GPU run P (session 6, nvidia-h200-x2): discovery.
# Phase 1 (both GPUs): where the 8B step's time goes on 1 and 2 GPUs (traces), the all-reduce
# alone under NCCL / XLA variants, the 2-GPU step with synchronous all-reduces.
# Phase 2 (one GPU each): GPU0 the small shape at batch 256 (served, bound, torch, profile);
# GPU1 the 1.2B shape (head_dim 64: builds its kernels) at 64 / 256 with torch.
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1 MAX_JOBS=16
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/p.log; }
env | grep -E "^NCCL" > $OUT/p_env.log
nvidia-smi topo -m >> $OUT/p_env.log 2>&1
timeout 200 python3 benchmarks/tp_bench.py --gpus 1 2 --batches 64 --ctx 1024 --steps 30 --trace-dir $OUT/trace --out $OUT/tp > $OUT/p_tp_trace.log 2>&1; el tp_trace
for proto in default LL LL128 Simple; do
  if [ $proto = default ]; then unset NCCL_PROTO; else export NCCL_PROTO=$proto; fi
  timeout 40 python3 benchmarks/tp_bench.py --allreduce-only --batches 64 256 >> $OUT/p_ar.log 2>&1; el ar_$proto
done
unset NCCL_PROTO
XLA_FLAGS="--xla_gpu_disable_async_collectives=ALLREDUCE" timeout 40 python3 benchmarks/tp_bench.py --allreduce-only --batches 64 >> $OUT/p_ar.log 2>&1; el ar_sync
XLA_FLAGS="--xla_gpu_disable_async_collectives=ALLREDUCE" timeout 110 python3 benchmarks/tp_bench.py --gpus 2 --batches 64 --ctx 1024 --steps 30 > $OUT/p_tp_sync.log 2>&1; el tp_sync
(
 export CUDA_VISIBLE_DEVICES=0
 timeout 200 python3 benchmarks/serve_bench.py decode --shapes small --batches 256 --steps 36 --decode-steps 1 4 --out $OUT/sb_small > $OUT/p_small256.log 2>&1
 timeout 90 python3 benchmarks/profile_step.py --shape small --batch 256 --steps 20 --trace-dir $OUT/trace_small256 > $OUT/p_prof256.log 2>&1
) &
(
 export CUDA_VISIBLE_DEVICES=1
 timeout 330 python3 benchmarks/serve_bench.py decode --shapes 1b --batches 64 256 --steps 36 --decode-steps 4 --out $OUT/sb_1b > $OUT/p_1b.log 2>&1
) &
wait; el phase2
ls ~/.cache/flashinfer/*/*/cached_ops/ > $OUT/p_built.txt 2>&1
tar -cJf $OUT/fi-new.tar.xz -C ~/.cache/flashinfer . 2>/dev/null
grep -A6 "^GPUs" $OUT/p_tp_trace.log; grep -h "trace (per" $OUT/p_tp_trace.log | cut -c1-1500
grep -h '"devices"' $OUT/p_ar.log | cut -c1-140; grep -A3 "^GPUs" $OUT/p_tp_sync.log; grep -h "Error\|error:" $OUT/p_ar.log | head -3
grep -h -A4 "^decode step" $OUT/p_small256.log $OUT/p_1b.log
grep -h "served step\|device-bound step\|span_us\|busy_us\|kernels_per" $OUT/p_prof256.log
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
