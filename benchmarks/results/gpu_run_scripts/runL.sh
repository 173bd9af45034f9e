#!/bin/bash
# GPU run L (session 5, nvidia-h200-x2): tensor parallel with static host plans as FFI calls on
# 2 GPUs (test + tp_bench 8B, batch 64/256); then in parallel: GPU0 the README e2e example with
# the host-time breakdown (prefix cache on/off, legacy), GPU1 serve_hf on a 1B random checkpoint
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH MAX_JOBS=16 PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/l.log; }
timeout 170 python3 -m pytest -q -s -m gpu tests/test_tp_gpu.py -p no:cacheprovider > $OUT/l_tp_test.log 2>&1; el tp_test
timeout 290 python3 benchmarks/tp_bench.py --gpus 1 2 --batches 64 256 --ctx 1024 --steps 30 --out $OUT > $OUT/l_tp_bench.log 2>&1; el tp_bench
E="--requests 128 --batch 64 --chunk 512 --num-pages 4096 --layers 8 --d-model 1024 --heads 16 --kv-heads 4 --head-dim 128 --ffn 2816 --vocab 32000 --prompt-len 64 512 --gen-len 32 256 --prefix-len 256"
(
 export CUDA_VISIBLE_DEVICES=0
 timeout 50 python3 examples/decode.py $E --no-check > $OUT/l_e2e_pc.log 2>&1
 timeout 50 python3 examples/decode.py $E --no-check --no-prefix-cache > $OUT/l_e2e_nopc.log 2>&1
 cd .legacy && PYTHONPATH=.:/tmp/site timeout 40 python3 examples/decode.py $E --no-check > $OUT/l_e2e_before.log 2>&1
) &
(
 export CUDA_VISIBLE_DEVICES=1
 python3 benchmarks/write_random_checkpoint.py --out /tmp/llama1b --preset 1b --dtype bfloat16 > $OUT/l_ckpt.log 2>&1
 python3 -c "
import random; random.seed(0)
open('/tmp/prompts.txt','w').write(''.join(' '.join(f'w{random.randrange(3,128000)}' for _ in range(random.randrange(16,200)))+'\n' for _ in range(64)))"
 timeout 140 python3 examples/serve_hf.py --model /tmp/llama1b --backend flashinfer --dtype float16 --batch 64 --max-new-tokens 128 --ignore-eos --quiet --prompts-file /tmp/prompts.txt > $OUT/l_serve_hf.log 2>&1
) &
wait; el phase2
tail -4 $OUT/l_tp_test.log; grep -A8 "^GPUs" $OUT/l_tp_bench.log; grep -h "warm-up\|prefill of" $OUT/l_tp_bench.log
for f in $OUT/l_e2e_*.log $OUT/l_serve_hf.log; do echo "--- $f"; grep -h -i "throughput\|host time\|steps  \|load\|generated tok" $f | cut -c1-220; done
grep -h "Traceback\|Error" $OUT/*.log | head -10
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
