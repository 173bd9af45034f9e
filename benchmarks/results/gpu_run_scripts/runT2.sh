#!/bin/bash
# GPU run T2 (session 8, nvidia-h200-x2). Issue 13: the probe with the engine's calling pattern
# (a new input buffer and a new output each call) against stable buffers, with and without the
# all-reduces in the command buffers, traced: does XLA re-record the whole command buffer (and
# re-trace each NCCL call) every execution because an input moved?
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/t2.log; }
timeout 300 python3 benchmarks/tp_layers_probe.py --gpus 2 --processes 1 --collectives-in-graphs --trace-dir $OUT/probe_tr > $OUT/t2_probe.log 2>&1; el probe
tail -8 $OUT/t2_probe.log
grep -o '"mode": "[a-z]*".\{0,0\}\|"host": {[^}]*}[^}]*}[^}]*}[^}]*}' $OUT/t2_probe.log | head -20
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
