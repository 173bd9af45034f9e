#!/bin/bash
# GPU run T4 (session 8, one H200): the README's GPU example command as written, and the e2e
# figure (README "Performance": the engine against the code before it, .legacy = ffc2afe), last
# measured in session 5 (run N): is it still >= 3x with sessions 6-8's changes?
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/t4.log; }
E="--requests 128 --batch 64 --chunk 512 --num-pages 4096 --layers 8 --d-model 1024 --heads 16 --kv-heads 4 --head-dim 128 --ffn 2816 --vocab 32000 --prompt-len 64 512 --gen-len 32 256 --prefix-len 256"
timeout 150 python3 examples/decode.py --dtype float16 > $OUT/t4_readme_example.log 2>&1; echo "rc $?" >> $OUT/t4_readme_example.log; el readme
timeout 100 python3 examples/decode.py $E --no-check > $OUT/t4_e2e_engine.log 2>&1; el e2e
(cd .legacy && PYTHONPATH=.:/tmp/site timeout 70 python3 examples/decode.py $E --no-check > $OUT/t4_e2e_before.log 2>&1); el before
timeout 100 python3 examples/decode.py $E --no-check > $OUT/t4_e2e_engine2.log 2>&1; el e2e2
tail -12 $OUT/t4_readme_example.log | cut -c1-200
for f in $OUT/t4_e2e_*.log; do echo "--- $f"; grep -h -A2 "throughput\|host time\|steps  " $f | cut -c1-140; done
grep -h "Traceback\|Error" $OUT/*.log | sort | uniq -c | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
