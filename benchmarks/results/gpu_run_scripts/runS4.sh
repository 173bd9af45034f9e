#!/bin/bash
# GPU run S4: S3's issue-10 figure again after the page-slack fix (S3's serve_bench stopped on a
# request outgrowing max_pages_per_seq).
source .gpu-carry/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
timeout 280 python3 benchmarks/serve_bench.py decode --shapes 1b --batches 64 256 --steps 24 --decode-steps 4 --out $OUT/sb1b > $OUT/s4_1b.log 2>&1; echo "rc $?"
grep -h -A4 "^decode step" $OUT/s4_1b.log; grep -h "Error" $OUT/s4_1b.log | tail -3
