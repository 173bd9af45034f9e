#!/bin/bash
# GPU run K (session 5, nvidia-h200-x2): tensor parallel as main has it (callback transport on 2
# GPUs): the 2-GPU equality test and tp_bench at the 8B shape, batch 64, 1 vs 2 GPUs
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH MAX_JOBS=16 PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/k.log; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $OUT/k.log
env | grep -i nccl | tee -a $OUT/k.log
timeout 200 python3 -m pytest -q -s -m gpu tests/test_tp_gpu.py -p no:cacheprovider > $OUT/k_tp_test.log 2>&1; el tp_test
timeout 330 python3 benchmarks/tp_bench.py --gpus 1 2 --batches 64 --ctx 1024 --steps 30 --out $OUT > $OUT/k_tp_bench.log 2>&1; el tp_bench
tail -5 $OUT/k_tp_test.log; grep -A6 "^GPUs" $OUT/k_tp_bench.log; grep -h "warm-up\|prefill of\|Traceback\|Error" $OUT/*.log | head -20
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
