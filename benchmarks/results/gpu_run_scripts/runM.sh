#!/bin/bash
# GPU run M (session 5, nvidia-h200-x2). A: tensor parallel 8B batch 64: 1 GPU vs 2 GPUs with
# XLA's one-shot all-reduce kernel (+ collectives in command buffers). B, in parallel: GPU0 the
# GPU suite (issue 9); GPU1 the README e2e with the CPU mirror + legacy, serve_bench 1.2B shape
# (engine vs torch), serve_hf on a 1B random checkpoint (issue 12)
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/m.log; }
TP="benchmarks/tp_bench.py --batches 64 --ctx 1024 --steps 30"
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
OS="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"
MAX_JOBS=16 timeout 75 python3 $TP --gpus 1 --out $OUT/tp1 > $OUT/m_tp1.log 2>&1; el tp1
XLA_FLAGS="$OS" timeout 80 python3 $TP --gpus 2 --out $OUT/tp2os > $OUT/m_tp2os.log 2>&1; el tp2_oneshot
XLA_FLAGS="$OS $CB,COLLECTIVES" timeout 80 python3 $TP --gpus 2 --out $OUT/tp2oscol > $OUT/m_tp2oscol.log 2>&1; el tp2_oneshot_collectives
E="--requests 128 --batch 64 --chunk 512 --num-pages 4096 --layers 8 --d-model 1024 --heads 16 --kv-heads 4 --head-dim 128 --ffn 2816 --vocab 32000 --prompt-len 64 512 --gen-len 32 256 --prefix-len 256"
(
 export CUDA_VISIBLE_DEVICES=0 MAX_JOBS=12
 timeout 315 python3 -m pytest -q -m gpu tests/test_flashinfer_gpu.py tests/test_serving_gpu.py -p no:cacheprovider -rs > $OUT/m_suite.log 2>&1
 echo "suite rc $?" >> $OUT/m_suite.log
) &
(
 export CUDA_VISIBLE_DEVICES=1 MAX_JOBS=12
 timeout 45 python3 examples/decode.py $E --no-check > $OUT/m_e2e_pc.log 2>&1
 (cd .legacy && PYTHONPATH=.:/tmp/site timeout 40 python3 examples/decode.py $E --no-check > $OUT/m_e2e_before.log 2>&1)
 python3 benchmarks/write_random_checkpoint.py --out /tmp/llama1b --preset 1b --dtype bfloat16 > $OUT/m_ckpt.log 2>&1 &
 timeout 120 python3 benchmarks/serve_bench.py decode --shapes 1b --batches 64 --steps 30 --decode-steps 4 --out $OUT/sb1b > $OUT/m_sb1b.log 2>&1
 wait
 python3 -c "
import random; random.seed(0)
open('/tmp/prompts.txt','w').write(''.join(' '.join(f'w{random.randrange(3,128000)}' for _ in range(random.randrange(16,200)))+'\n' for _ in range(64)))"
 timeout 150 python3 examples/serve_hf.py --model /tmp/llama1b --backend flashinfer --dtype float16 --batch 64 --max-new-tokens 128 --ignore-eos --quiet --no-mixed --prompts-file /tmp/prompts.txt > $OUT/m_serve_hf.log 2>&1
) &
wait; el partB
grep -h -A3 "^GPUs" $OUT/m_tp*.log; grep -h "allreduce\|Error" $OUT/m_tp*.log | cut -c1-300
tail -3 $OUT/m_suite.log
for f in $OUT/m_e2e_*.log; do echo "--- $f"; grep -h -A2 "throughput\|host time" $f | cut -c1-120; done
grep -h -A6 "^decode step" $OUT/m_sb1b.log; tail -4 $OUT/m_serve_hf.log | cut -c1-300; tail -2 $OUT/m_ckpt.log
grep -h "Traceback" $OUT/*.log | head -5
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
