#!/bin/bash
# GPU run T3 (session 8, nvidia-h200-x2). Issue 13.
# 1. The layer probe (stable buffers) under all-reduce / matmul variants: NCCL protocols, XLA's
#    one-shot all-reduce kernel, cuBLAS instead of Triton gemms. Kernel times per GPU from traces.
# 2. tp_bench at batch 64 and 256 on 1 and 2 GPUs (the lm_head split, the new timing).
# 3. tests/test_tp_gpu.py (FlashInfer over 2 GPUs against one GPU) with the split lm_head.
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/t3.log; }
if [ "$1" != "b" ]; then
P="benchmarks/tp_layers_probe.py --gpus 2 --processes 1 --modes stable --iters 20 --reps 5"
timeout 60 python3 $P --trace-dir $OUT/pt_base > $OUT/t3_probe_base.log 2>&1; el base
NCCL_PROTO=LL128 timeout 60 python3 $P --trace-dir $OUT/pt_ll128 > $OUT/t3_probe_ll128.log 2>&1; el ll128
NCCL_PROTO=Simple timeout 60 python3 $P --trace-dir $OUT/pt_simple > $OUT/t3_probe_simple.log 2>&1; el simple
XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true timeout 60 python3 $P --trace-dir $OUT/pt_oneshot > $OUT/t3_probe_oneshot.log 2>&1; el oneshot
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 60 python3 $P --trace-dir $OUT/pt_cublas > $OUT/t3_probe_cublas.log 2>&1; el cublas
for f in base ll128 simple oneshot cublas; do echo "--- $f"; tail -3 $OUT/t3_probe_$f.log; python3 - $OUT/t3_probe_$f.log <<'PY'
import json, sys
for ln in open(sys.argv[1]):
    if ln.startswith("{"):
        r = json.loads(ln)
        print(r["gpus"], "GPU:", "; ".join(f"{n[:38]} {us:.0f}/{c:.0f}" for n, us, c in r.get("kernels_per_gpu", [])[:7]))
PY
done
timeout 120 python3 -m pytest -v -m gpu -p no:cacheprovider -rs tests/test_tp_gpu.py > $OUT/t3_tp_test.log 2>&1; echo "tp test rc $?" >> $OUT/t3_tp_test.log; el tp_test
fi
if [ "$1" = "b" ]; then
timeout 340 python3 benchmarks/tp_bench.py --gpus 1 2 --batches 64 256 --steps 30 --out $OUT/tpb > $OUT/t3_tp.log 2>&1; el tp
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 200 python3 benchmarks/tp_bench.py --gpus 1 2 --batches 64 --steps 30 --out $OUT/tpb_cublas > $OUT/t3_tp_cublas.log 2>&1; el tp_cublas
fi
grep -h -A5 "^GPUs" $OUT/t3_tp.log $OUT/t3_tp_cublas.log; grep -h "warm-up\|prefill of" $OUT/t3_tp.log
grep -E "PASSED|FAILED|ERROR|passed|failed|rc " $OUT/t3_tp_test.log | tail -6 | cut -c1-200
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
