#!/bin/bash
# GPU run N (session 5, nvidia-h200-x2, last ~6 device minutes). GPU0: the rest of the GPU suite
# (run M passed the first 58 tests, through test_prefill_bf16, before its timeout; POD last: its
# kernel compiles ~2 min). GPU1: the README e2e with the CPU mirror + legacy, then serve_hf 1B.
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1 MAX_JOBS=14
T0=$(date +%s)
el() { echo "=== $1 elapsed $(( $(date +%s) - T0 ))" | tee -a $OUT/n.log; }
E="--requests 128 --batch 64 --chunk 512 --num-pages 4096 --layers 8 --d-model 1024 --heads 16 --kv-heads 4 --head-dim 128 --ffn 2816 --vocab 32000 --prompt-len 64 512 --gen-len 32 256 --prefix-len 256"
(
 export CUDA_VISIBLE_DEVICES=0
 timeout 285 python3 -m pytest -v -m gpu -p no:cacheprovider -rs tests/test_serving_gpu.py tests/test_flashinfer_gpu.py::test_batch_pod tests/test_flashinfer_gpu.py::test_pod_rejects_soft_cap tests/test_flashinfer_gpu.py::test_append_in_place tests/test_flashinfer_gpu.py::test_decode_step_in_one_jit_copies_no_page tests/test_flashinfer_gpu.py::test_decode_steps_with_host_plans tests/test_flashinfer_gpu.py::test_host_plan_mismatch_is_flagged_and_the_queue_recovers tests/test_flashinfer_gpu.py::test_host_plans_of_chunked_prefill_steps tests/test_flashinfer_gpu.py::test_static_host_plans_over_decode_steps tests/test_flashinfer_gpu.py::test_static_host_plans_of_chunked_prefill_steps tests/test_flashinfer_gpu.py::test_pod tests/test_flashinfer_gpu.py::test_pod_back_to_back > $OUT/n_suite.log 2>&1
 echo "suite rc $?" >> $OUT/n_suite.log
) &
(
 export CUDA_VISIBLE_DEVICES=1
 python3 benchmarks/write_random_checkpoint.py --out /tmp/llama1b --preset 1b --dtype bfloat16 > $OUT/n_ckpt.log 2>&1 &
 timeout 70 python3 examples/decode.py $E --no-check > $OUT/n_e2e_pc.log 2>&1
 (cd .legacy && PYTHONPATH=.:/tmp/site timeout 50 python3 examples/decode.py $E --no-check > $OUT/n_e2e_before.log 2>&1)
 wait
 python3 -c "
import random; random.seed(0)
open('/tmp/prompts.txt','w').write(''.join(' '.join(f'w{random.randrange(3,128000)}' for _ in range(random.randrange(16,200)))+'\n' for _ in range(64)))"
 timeout 150 python3 examples/serve_hf.py --model /tmp/llama1b --backend flashinfer --dtype float16 --batch 64 --max-new-tokens 128 --ignore-eos --quiet --no-mixed --prompts-file /tmp/prompts.txt > $OUT/n_serve_hf.log 2>&1
 echo "serve_hf rc $?" >> $OUT/n_serve_hf.log
) &
wait; el all
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|suite rc" $OUT/n_suite.log | tail -45 | cut -c1-160
for f in $OUT/n_e2e_*.log; do echo "--- $f"; grep -h -A2 "throughput\|host time\|steps  " $f | cut -c1-120; done
tail -5 $OUT/n_serve_hf.log | cut -c1-300; tail -1 $OUT/n_ckpt.log
tar czf /tmp/all.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
