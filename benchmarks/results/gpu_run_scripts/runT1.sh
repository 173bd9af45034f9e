#!/bin/bash
# GPU run T1 (session 8, nvidia-h200-x2). Issue 13.
# 1. tp_layers_probe: the 8B layers' matmuls + all-reduces alone on 1 GPU, 2 GPUs in one process,
#    2 GPUs one process each; each 2-GPU variant also with the all-reduces in the command buffers.
# 2. tp_bench 1 and 2 GPUs at batch 64 with the lm_head split by vocabulary (new) and the new timing.
# 3. tp_bench 2 GPUs, collectives in the command buffers, traced (is the step one graph? AR cost?).
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
env | grep -E "^NCCL" | tee $OUT/t1_env.log
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/t1.log; }
timeout 230 python3 benchmarks/tp_layers_probe.py --gpus 2 --processes 1 2 --collectives-in-graphs > $OUT/t1_probe.log 2>&1; el probe
timeout 200 python3 benchmarks/tp_bench.py --gpus 1 2 --batches 64 --steps 30 --out $OUT/tpb > $OUT/t1_tp.log 2>&1; el tp
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES" timeout 130 python3 benchmarks/tp_bench.py --gpus 2 --batches 64 --steps 30 --trace-dir $OUT/trace_coll > $OUT/t1_tp_coll.log 2>&1; el tp_coll
tail -8 $OUT/t1_probe.log
grep -h -A3 "^GPUs" $OUT/t1_tp.log $OUT/t1_tp_coll.log; grep -h "warm-up\|prefill of" $OUT/t1_tp.log
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
