#!/bin/bash
# The evaluation as SLURM jobs, each started when the ones before it succeeded (--dependency=afterok):
#
#   prepare (array) → finetune → sample (array) and ground (array) → report
#
# Every step resumes when requeued (exit 75: a signal or a busy folder; see run-step.sh), and a failed step
# cancels the jobs after it. Environment (the *.sbatch scripts read theirs from it):
#   MIMIC, BASE_MODEL    the MIMIC-CXR tree and the Stable Diffusion folder to start from
#   WORK=work            the folder of every step's output (prepared/, frozen/, samples/, ground/, report/)
#   TASKS=8              array tasks of prepare, sample and ground
#   MODEL                an existing model folder: no finetune job, sample/ground/report use it
#   PREPARE_ARGS, SAMPLE_ARGS, GROUND_ARGS, REPORT_ARGS, SBATCH_ARGS (given to every sbatch)
#   WAIT=1               block until the report ends and exit with its code (sbatch --wait)
#
#   MIMIC=/data/mimic BASE_MODEL=/models/sd2-base scripts/pipeline.sh
set -euo pipefail
S=$(cd "$(dirname "$0")" && pwd)
: "${MIMIC:?set MIMIC}" "${BASE_MODEL:?set BASE_MODEL}"
WORK=${WORK:-work}
TASKS=${TASKS:-8}
export CXRDIFF_SCRIPTS=$S MIMIC BASE_MODEL
mkdir -p logs

submit() {  # submit NAME SBATCH_OPTIONS... SCRIPT: print "NAME ID" and keep the id in $ID
  local name=$1
  shift
  # shellcheck disable=SC2086  # SBATCH_ARGS is a word list
  ID=$(sbatch --parsable --kill-on-invalid-dep=yes ${SBATCH_ARGS:-} "$@" | cut -d';' -f1)
  echo "$name $ID"
}

OUT=$WORK/prepared submit prepare --array=0-$((TASKS - 1)) "$S/prepare.sbatch"
prepare=$ID
after=$prepare
if [ -z "${MODEL:-}" ]; then
  MODEL=$WORK/frozen
  DATA=$WORK/prepared OUT=$MODEL submit finetune --dependency=afterok:$prepare "$S/finetune.sbatch"
  after=$ID
fi
export MODEL
PROMPTS=$WORK/prepared/test.parquet OUT=$WORK/samples \
  submit sample --dependency=afterok:$after --array=0-$((TASKS - 1)) "$S/sample.sbatch"
sample=$ID
DATA=$WORK/prepared/ms_cxr.parquet OUT=$WORK/ground \
  submit ground --dependency=afterok:$after --array=0-$((TASKS - 1)) "$S/ground.sbatch"
ground=$ID
if [ -n "${WAIT:-}" ]; then
  RUNS=$MODEL REAL=$WORK/prepared OUT=$WORK/report submit report --dependency=afterok:$sample:$ground --wait \
    "$S/report.sbatch"
else
  RUNS=$MODEL REAL=$WORK/prepared OUT=$WORK/report submit report --dependency=afterok:$sample:$ground \
    "$S/report.sbatch"
fi
