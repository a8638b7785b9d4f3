#!/usr/bin/env bash
# Preparation for studies/distill.yaml, per task (paraphrase, sonnets): the teacher, the pruned
# student, and the teacher's and student's responses. Every step is seeded and skipped when its
# output exists, so the script can be re-run after an interruption.
#
#   bash studies/distill-prepare.sh            # both tasks (CPU, 2 cores: about 40 minutes, most of it the teachers' SFT)
#   bash studies/distill-prepare.sh sonnets    # one task
#
# teacher  = the embedded model after SFT on the task (configs/<task>-sft-fft.yaml, results/foundation)
# student  = the teacher with 20% of its decoder layers removed (ShortGPT block influence)
# train/   = dsft.jsonl (teacher responses) + pairs.jsonl (chosen: teacher, rejected: student)
#            for the task's first N training prompts
# dev/     = dsft.jsonl: teacher responses to the dev prompts (task.score_records -> teacher_logp)
set -euo pipefail
cd "$(dirname "$0")/.."
POSTLAB=${POSTLAB:-.venv/bin/postlab}
OUT=${DISTILL_PREP:-runs/distill-prep}

prepare() {
  local task=$1 prompts=$2 new_tokens=$3
  local dir=$OUT/$task
  local teacher=$dir/teacher/0-sft/model
  $POSTLAB train configs/$task-sft-fft.yaml --output-dir "$dir/teacher" --resume
  [ -f "$dir/student/config.json" ] ||
    $POSTLAB prune "$teacher" --drop 0.2 --method block-influence --task "$task" --out "$dir/student"
  for split in train dev; do
    [ -f "$dir/$split/samples.json" ] ||
      $POSTLAB distill sample --teacher "$teacher" --student "$dir/student" --task "$task" --split $split \
        --limit "$prompts" --max-new-tokens "$new_tokens" --temperature 1.0 --top-p 0.9 --seed 0 --out "$dir/$split"
  done
}

tasks=${*:-paraphrase sonnets}
for t in $tasks; do
  case $t in
    paraphrase) prepare paraphrase 256 1 ;;   # the answer is one token: " yes" or " no"
    sonnets) prepare sonnets 64 96 ;;
    *) echo "distill-prepare: unknown task $t (paraphrase or sonnets)" >&2; exit 2 ;;
  esac
done
