#!/usr/bin/env bash
# Preparation for studies/distill.yaml (sonnets) or, with `pilot`, for studies/distill-pilot.yaml: the
# teacher, the 20%-pruned student, and their responses. Every step is seeded, pinned to fp32 and skipped
# when its output exists, so the script can be rerun after an interruption.
#
#   bash studies/distill-prepare.sh          # -> runs/distill-prep/sonnets/  (for distill.yaml)
#   bash studies/distill-prepare.sh pilot    # -> runs/distill-prep/pilot/    (for distill-pilot.yaml)
#
# Run from any directory; paths are the repository's. $POSTLAB_DATA (or ../shared/data) holds the data;
# $POSTLAB names the CLI (default .venv/bin/postlab), $DISTILL_PREP the output (default runs/distill-prep).
#
# study: teacher = studies/lr-reduction.yaml's run task=sonnets,sft_lr=eta,seed=1, its SFT stage only.
#   Its config is taken from that study's plan (so it is that stage, setting for setting) with
#   save_model: true; on the machine that ran lr-reduction the stage is copied from it (stage reuse),
#   elsewhere it is trained (~6 min). student = the teacher minus 6 of its 30 decoder layers (block
#   influence on the first 64 training sonnets). train/ = one response of each model to each of the 131
#   training prompts (dsft.jsonl: prompt -> teacher; pairs.jsonl: chosen teacher, rejected student);
#   dev/ = the teacher's responses to the 12 dev prompts (distill.yaml's teacher_logp).
# pilot: the same on a validation split, never the dev set: teacher = that stage's recipe with seed 0
#   and task.validation: 12 (trained on sonnets 1-119, evaluated on 120-131); student pruned from it;
#   data/sonnets/ = a copy of the sonnets data whose training file holds sonnets 1-119 and whose "dev"
#   files hold 120-131 (distill stages train on records, and task.validation cannot be combined with
#   train_records, so the pilot evaluates on these files as its dev set); train/ = responses to the 119
#   training prompts, dev/ = the teacher's responses to the 12 validation prompts.
# Responses: temperature 1.0, top-p 0.9, 96 new tokens (cut to 11 lines), seed 0.
set -euo pipefail
cd "$(dirname "$0")/.."
POSTLAB=${POSTLAB:-.venv/bin/postlab}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${DISTILL_PREP:-runs/distill-prep}
SAMPLE=(--max-new-tokens 96 --temperature 1.0 --top-p 0.9 --seed 0 --precision fp32)

# The config of lr-reduction's teacher run, its first stage only: $1 output file, $2 "pilot" or "study".
teacher_config() {
  "$POSTLAB" study plan studies/lr-reduction.yaml --json | "$PYTHON" -c '
import json, sys
out, mode = sys.argv[1], sys.argv[2]
runs = json.load(sys.stdin)
cfg = next(r["config"] for r in runs if r["run_id"] == "task=sonnets,sft_lr=eta,seed=1")
cfg.pop("output_dir")
cfg["stages"] = cfg["stages"][:1]
cfg["stages"][0].update(save_model=True, keep_weights=True)  # neither is part of the stage key
if mode == "pilot":
    cfg["seed"] = 0
    cfg["stages"][0]["task"]["validation"] = 12
json.dump(cfg, open(out, "w"), indent=2)
' "$1" "$2"
}

train_teacher() {  # $1 run directory, $2 mode
  mkdir -p "$(dirname "$1")"
  [ -f "$1/result.json" ] && return
  teacher_config "$1.yaml" "$2"
  if [ -d "$1" ]; then "$POSTLAB" train "$1.yaml" --output-dir "$1" --resume
  else "$POSTLAB" train "$1.yaml" --output-dir "$1"; fi
}

# Sonnets 1-119 as training data, 120-131 as prompts and references (Folger format, as the task reads it).
validation_data() {  # $1 output folder (…/sonnets)
  [ -f "$1/TRUE_sonnets_held_out_dev.txt" ] && return
  mkdir -p "$1"
  "$PYTHON" -c '
import sys
from pathlib import Path
from postlab.tasks.base import data_dir
from postlab.tasks.sonnets import PROMPT_LINES, parse_sonnets
out = Path(sys.argv[1])
sonnets = parse_sonnets(data_dir() / "sonnets" / "sonnets.txt")
train, held = sonnets[:-12], sonnets[-12:]
head = "Sonnets (written by studies/distill-prepare.sh from sonnets.txt: {})\n\n"
def write(name, items, what, lines=None):
    text = head.format(what) + "".join(f"{n}\n\n" + "\n".join(ls[:lines]) + "\n\n" for n, ls in items)
    (out / name).write_text(text, encoding="utf-8")
write("sonnets.txt", train, "the training sonnets but the last 12")
write("sonnets_held_out_dev.txt", held, "the first 3 lines of the last 12", PROMPT_LINES)
write("TRUE_sonnets_held_out_dev.txt", held, "the last 12, held out")
' "$1"
}

prepare() {  # $1 mode: study or pilot
  local dir data=()
  if [ "$1" = pilot ]; then
    dir=$OUT/pilot
    validation_data "$dir/data/sonnets"
    data=(--data "$dir/data")
  else
    dir=$OUT/sonnets
  fi
  local teacher=$dir/teacher/0-sft/model
  train_teacher "$dir/teacher" "$1"
  [ -f "$dir/student/config.json" ] ||
    "$POSTLAB" prune "$teacher" --drop 0.2 --method block-influence --task sonnets --samples 64 \
      --out "$dir/student"
  for split in train dev; do
    [ -f "$dir/$split/samples.json" ] ||
      "$POSTLAB" distill sample --teacher "$teacher" --student "$dir/student" --task sonnets --split $split \
        ${data[@]+"${data[@]}"} "${SAMPLE[@]}" --out "$dir/$split"
  done
}

case ${1:-study} in
  study) prepare study ;;
  pilot) prepare pilot ;;
  *) echo "distill-prepare: unknown mode $1 (study or pilot)" >&2; exit 2 ;;
esac
