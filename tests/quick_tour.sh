#!/usr/bin/env bash
# The README's quick tour, run from an empty directory with only POSTLAB_DATA set and tiny limits:
#   POSTLAB_DATA=/path/to/data bash tests/quick_tour.sh /tmp/empty-dir
# Prints "== <command>: rc=N" for each; every rc should be 0. (Not part of make test: ~15 min on 2 cores.)
set -u
R="$(cd "$(dirname "$0")/.." && pwd)"
cd "${1:?usage: tests/quick_tour.sh EMPTY_DIR}" && rm -rf runs merged soup expo student distill out pairs.jsonl
export POSTLAB_DATA="${POSTLAB_DATA:?set POSTLAB_DATA to the data folder}" POSTLAB_CACHE="$PWD/cache"
P="$R/.venv/bin/postlab"
T="task.train_limit=16 task.dev_limit=8 max_steps=2 eval_batch_size=8 optim.batch_size=4"
S="task.train_limit=8 task.dev_limit=2 max_steps=1 eval_batch_size=2 optim.batch_size=4 task.generation.max_new_tokens=8 task.pairs.generation.max_new_tokens=8 task.max_completion_tokens=16"
ok() { echo "== $1: rc=$2"; }
$P train $R/configs/paraphrase-sft-fft.yaml $T --no-progress; ok train-sft-fft $?
$P train $R/configs/paraphrase-sft-lora.yaml optim.lr=1e-4 $T; ok train-lora $?
$P train $R/configs/paraphrase-sft-dpo-fft.yaml $T; ok train-sft-dpo $?
$P train $R/configs/paraphrase-sft-fft.yaml $T --resume; ok resume $?
$P train $R/configs/paraphrase-sft-dpo-fft.yaml --dry-run > /dev/null; ok dry-run $?
$P list objectives > /dev/null; ok list $?
$P eval runs/paraphrase-sft-fft/0-sft/model --task paraphrase --dev-limit 8; ok eval $?
$P eval runs/paraphrase-sft-fft/0-sft/model --task paraphrase --dev-limit 8 --reference smollm2-135m; ok eval-ref $?
$P train $R/configs/sonnets-sft-fft.yaml $S; ok train-sonnets $?
$P generate runs/sonnets-sft-fft/0-sft/model --prompt "Shall I compare thee" --seed 1 --max-new-tokens 8; ok generate $?
$P export runs/paraphrase-sft-lora/0-sft/model --merge --out merged/; ok export $?
printf '{"prompt": "Q: is 2 even? A:", "chosen": " yes", "rejected": " no"}\n{"prompt": "Q: is 3 even? A:", "chosen": " no", "rejected": " yes"}\n' > pairs.jsonl
$P diagnose runs/paraphrase-sft-dpo-fft/1-dpo/model --reference runs/paraphrase-sft-dpo-fft/0-sft/model --pairs pairs.jsonl --limit 2; ok diagnose $?
$P merge soup runs/paraphrase-sft-fft/0-sft/model merged --weights 2 1 --out soup/; ok soup $?
$P merge expo --sft runs/paraphrase-sft-dpo-fft/0-sft/model --dpo runs/paraphrase-sft-dpo-fft/1-dpo/model --lam 1.5 --out expo/; ok expo $?
$P prune smollm2-135m --drop 0.2 --method block-influence --task sonnets --samples 4 --out student/; ok prune $?
$P distill sample --teacher smollm2-135m --student student/ --task sonnets --limit 2 --max-new-tokens 8 --out distill/; ok distill $?
cat > tiny-study.yaml <<'YAML'
name: tiny
base:
  model: {name: smollm2-135m, precision: fp32}
  task: {name: paraphrase, train_limit: 8, dev_limit: 4}
  optim: {batch_size: 4}
  max_steps: 1
  eval_batch_size: 4
axes:
  param: {fft: {parameterization: {method: fft}}, lora: {parameterization: {method: lora}}}
  seed: [0, 1]
YAML
$P study plan tiny-study.yaml > /dev/null; ok study-plan $?
$P study plan $R/studies/demo.yaml > /dev/null; ok study-plan-demo $?
$P study run tiny-study.yaml --no-progress > /dev/null 2>&1; ok study-run $?
$P study report runs/tiny-study > /dev/null; ok study-report $?
$P study export runs/tiny-study --out out/tiny; ok study-export $?
