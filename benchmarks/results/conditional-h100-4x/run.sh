#!/bin/bash
# one prepared device run: class-conditional composed vs monolith at 4x the default
# training budget, proportional split, with the FD-over-seeds and denoising-loss
# diagnostics (benchmarks/conditional.py); the routing heads are the CPU run's (they do
# not depend on the budget), carried in .whl/w4; results and all weights to $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/diffusers-*.whl .whl/importlib_metadata-*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name --format=csv,noheader; nproc
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.is_available())" || exit 4
mkdir -p /tmp/w && cp .whl/w4/* /tmp/w/
finish() { cp -r /tmp/res/. $OUT/ 2>/dev/null; tar cf $OUT/weights-4x.tar -C /tmp/w . ; ls -la $OUT; }
trap finish EXIT
timeout ${LIMIT:-560} python3 benchmarks/conditional.py --data /tmp/dd --device cuda --jobs 8 \
  --variants cond --budgets 4 --deadline ${DEADLINE:-470} --n 1000 --per-label 100 \
  --per-single 50 --fd-seeds 3 --reuse /tmp/w --results /tmp/res 2>&1 | tr '\r' '\n' | grep -v 'it/s' | tee $OUT/conditional.log | tail -40
