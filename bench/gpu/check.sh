#!/usr/bin/env bash
# The GPU checks of issue 17 in one prepared run on a lent GPU machine (the `device` tool), within a
# time budget, most important first. Prepare here with bench/gpu/prepare.sh, then one device call:
#
#   run(command="bash bench/gpu/check.sh", carry=[".gpu"], timeout_s=580)
#
# Steps (each bounded by what is left of BUDGET seconds, default 540, so a rerun still fits a
# session's 15 device minutes; a failed step is logged and the next one runs):
#   1. setup: the carried wheels into /tmp/site, the embedded architecture with random weights as
#      postlab's converted embedded model (prepare.sh says why), the data from .gpu/data
#   2. tests/test_on_gpu.py: no host synchronisation inside training steps (CUDA sync debug mode),
#      GPU log-probs against the CPU's, an SFT -> DPO run in bf16, a stage compiled by inductor
#   3. bench/vs_trl.py --device cuda --precision bf16 (SFT and DPO on paraphrase, postlab vs TRL)
#   4. bench/mfu.py --device cuda --precision bf16 at batch 16 and 64 (MFU against the GPU's matmul peak)
#   5. bench/profile_step.py --device cuda --precision bf16 (GPU busy fraction, kernel launches per step)
#   6. postlab study plan studies/sft-dpo-paper.yaml --measure (the source study's time on this GPU)
#   7. with FULL_SUITE=1: the CPU test suite on this machine's versions of torch and transformers
# ONLY="mfu study-plan" runs just those steps (a rerun on the still-warm machine: setup is quick).
# Everything lands in $OUT (check.log with the versions, one file per step: at most 8); commit what matters under
# bench/results/ and results/ with the command above and the GPU named.
#
# A dry run here, on the CPU (checks the script, not the GPU):
#   PY=.venv/bin/python DEVICE=cpu N=32 REPEATS=1 OUT=/tmp/gpu-out POSTLAB_HOME=/tmp/gpu-home bash bench/gpu/check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
OUT=${OUT:-/tmp/postlab-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
END=$((SECONDS + BUDGET))

# step NAME MAX_SECONDS COMMAND...: runs COMMAND for at most MAX_SECONDS or what is left of the budget
step() {
  local name=$1 max=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then echo "== $name: not in ONLY"; return 0; fi
  local left=$((END - SECONDS - 5))
  ((left < max)) && max=$left
  if ((max < 20)); then echo "== $name: skipped (budget spent)"; return 0; fi
  echo "== $name (at most ${max}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$max" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s"
}

# 1. setup
[ -d .gpu/whl ] || { echo "no .gpu/ here: run bench/gpu/prepare.sh and carry .gpu" >&2; exit 2; }
SITE=${SITE:-/tmp/site}
if [ "$PY" = python3 ]; then  # the device's own Python: add the packages it lacks
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/whl/*.whl || exit 3
  export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export POSTLAB_HOME=${POSTLAB_HOME:-/tmp/postlab-home}
DATA=.gpu/data  # the repository's parent may not be writable there: no ../shared/data
STUDY=/tmp/postlab-gpu-study.yaml
sed "s#\.\./shared/data#$DATA#g" studies/sft-dpo-paper.yaml > "$STUDY"
$PY - <<'PYEOF' || exit 4
import os, shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
target = Path(os.environ["POSTLAB_HOME"]) / "models" / "smollm2-135m"
if not (target / "model.safetensors").is_file():
    tmp = target.with_name(".smollm2-135m-random")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(".gpu/model", tmp)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp), dtype=torch.float32)
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, target)
print("model: the embedded architecture with random weights (seed 0) at", target)
PYEOF
{
  date -u; uname -a; nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers, peft, accelerate, trl, pydantic; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'trl', trl.__version__, 'pydantic', pydantic.__version__); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  cat .gpu/commit.txt
} 2>&1

# 2. correctness on the GPU
step gpu-tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_on_gpu.py -rs --junitxml="$OUT/gpu_tests.xml"

# 3. postlab vs TRL on this device
step vs-trl 210 $PY bench/vs_trl.py --device "$DEVICE" --precision bf16 --cases sft-paraphrase,dpo-paraphrase \
  --n "${N:-512}" --batch 16 --repeats "${REPEATS:-2}" --warm --data "$DATA" --out "$OUT/vs_trl_${DEVICE}_bf16.json"

# 4. model FLOPs utilisation against this device's matmul peak, at the CPU configs' batch and a GPU-sized one
step mfu 90 bash -c "set -o pipefail; for b in 16 64; do $PY bench/mfu.py --device $DEVICE --precision bf16 --n ${N:-512} --batch \$b \
  --repeats 2 --data $DATA --out $OUT/mfu_${DEVICE}_bf16_batch\$b.json | tail -3 || exit 1; done"

# 5. where a bf16 SFT step's time goes on this device: GPU busy fraction, kernel launches per step
step profile 60 $PY bench/profile_step.py --device "$DEVICE" --precision bf16 --batch 16 --steps 3 --data "$DATA" \
  --out "$OUT/profile_sft_${DEVICE}_bf16.json"

# 6. the source study's plan, measured on this device
step study-plan 60 bash -c "$PY -m postlab study plan '$STUDY' --measure > '$OUT/study_plan_measured.txt' 2>&1; rc=\$?; grep -A2 'total:' '$OUT/study_plan_measured.txt'; exit \$rc"

# 7. the CPU suite on this machine's library versions (optional: long)
if [ "${FULL_SUITE:-0}" = 1 ]; then
  step cpu-suite 400 $PY -m pytest -q -p no:cacheprovider -m "not slow" -x -n 8 tests --junitxml="$OUT/suite.xml"
fi
echo "== done: $((SECONDS))s of ${BUDGET}s; files in $OUT"
sleep 1  # lets tee write the last lines
