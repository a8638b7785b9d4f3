#!/usr/bin/env bash
# Packs, here, what a lent GPU machine needs to run bench/gpu/check.sh, into .gpu/ (ignored by git;
# a `device` call carries it with carry: [".gpu"]). That machine reaches no network and has Python
# 3.12 with PyTorch, transformers, peft, accelerate, sacrebleu and pytest, but not pydantic, trl, gguf
# or datasets; a call carries the repository alone (at most 64 MiB), not ../shared/data.
#
#   .gpu/whl/     wheels (cp312, manylinux) of the missing packages, at the versions in .venv
#   .gpu/data/    a copy of the data folder (default ../shared/data)
#   .gpu/model/   the embedded model's config and tokenizer. Its weights are not carried: the GGUF
#                 (98 MB) is over a call's 64 MiB, so check.sh builds the same architecture with
#                 random weights. Speed, memory and the correctness tests do not depend on the values;
#                 a study's quality numbers would (none is run there).
#
#   bench/gpu/prepare.sh [DATA]          (needs `make install` first; about a minute)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-../shared/data}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run make install first" >&2; exit 1; }
[ -d "$DATA" ] || { echo "no data folder at $DATA (give its path as the first argument)" >&2; exit 1; }

rm -rf .gpu && mkdir -p .gpu/whl .gpu/model
# The packages the GPU image lacks (see /work/.library/device/KINDS.md), at the versions tested here.
PKGS="pydantic pydantic_core annotated_types typing_inspection typing_extensions trl gguf datasets dill multiprocess"
PINS=$("$PY" - $PKGS <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{n.replace('_', '-')}=={version(n)}" for n in sys.argv[1:]))
PYEOF
)
echo "wheels: $PINS"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl $PINS
cp -r "$DATA" .gpu/data
MODEL=$("$PY" -c "from postlab.models import embedded_model_dir; print(embedded_model_dir('smollm2-135m'))")
find "$MODEL" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} .gpu/model/ \;
{ git log -1 --format='postlab commit %H %s'; git status --short | sed 's/^/  uncommitted: /'; } > .gpu/commit.txt
du -sh .gpu/* && du -sh .gpu
echo "next: a device run with carry [\".gpu\"] and the command  bash bench/gpu/check.sh"
