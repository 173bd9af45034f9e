#!/bin/bash
# GPU run T5 (session 8, nvidia-h200-x2). Issue 13: EngineConfig.overlap_dispatch on 1 and 2 GPUs
# (8B, batch 64): does moving the step's launch (~4.5 ms of XLA host work a 2-GPU step, which holds
# the calling thread) off the Python thread take the served 2-GPU step toward its ~5.1 ms of kernels?
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/t5.log; }
timeout 200 python3 benchmarks/tp_bench.py --gpus 1 2 --batches 64 --steps 30 --overlap-dispatch --out $OUT/tpb_overlap > $OUT/t5_tp_overlap.log 2>&1; el overlap
timeout 200 python3 benchmarks/tp_bench.py --gpus 1 2 --batches 64 --steps 30 --out $OUT/tpb > $OUT/t5_tp.log 2>&1; el inline
grep -h -A3 "^GPUs" $OUT/t5_tp_overlap.log $OUT/t5_tp.log
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
