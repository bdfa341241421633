#!/bin/bash
# Run one cxrdiff step inside a SLURM job: pass SIGTERM / SIGUSR1 on to it, and requeue the job when the step
# exits 75 (EX_TEMPFAIL: stopped by a signal at a clean point, or its --out busy with another process), a
# bounded number of times. Any other exit code ends the job with that code (2 bad input, 1 failure).
#
#   run-step.sh cxrdiff sample --shard slurm ...      (the *.sbatch scripts beside it call it so)
#
# `scancel --batch --signal=TERM` and SLURM's --signal=B:USR1@N reach only the batch shell, and a shell waiting
# for a foreground command runs its traps only after the command ends; hence the step runs in the background
# and the trap forwards the signal.
set -uo pipefail

# Under `accelerate launch` (CXRDIFF="accelerate launch -m cxrdiff") the launcher exits 1 when a rank fails;
# each rank appends its own exit code here: a 75 (a rank stopped by the signal; the others may fail on
# the missing peer) and no 2 (bad input) counts as 75.
export CXRDIFF_EXIT_FILE=${CXRDIFF_EXIT_FILE:-$(mktemp "${TMPDIR:-/tmp}/cxrdiff-exit.XXXXXX")}
: >"$CXRDIFF_EXIT_FILE"

"$@" &
child=$!
forward() { kill -s "$1" "$child" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward USR1' USR1
wait "$child"
status=$?
while kill -0 "$child" 2>/dev/null; do  # `wait` returns early (code > 128) when a trap ran
  wait "$child"
  status=$?
done
trap - TERM USR1
if [ "$status" -ne 0 ] && grep -qx 75 "$CXRDIFF_EXIT_FILE" && ! grep -qx 2 "$CXRDIFF_EXIT_FILE"; then
  status=75
fi
rm -f "$CXRDIFF_EXIT_FILE"

echo "cxrdiff step exit $status (job ${SLURM_JOB_ID:-none}, task ${SLURM_ARRAY_TASK_ID:-none}," \
  "restart ${SLURM_RESTART_COUNT:-0})" >&2
if [ "$status" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_REQUEUES:-10}" ]; then
  # This task only: one task of an array runs under the array's own id (SLURM_JOB_ID = SLURM_ARRAY_JOB_ID),
  # and requeueing that id requeues every task of the array, running ones included.
  if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    scontrol requeue "$SLURM_JOB_ID"
  fi  # the same command then resumes where this one stopped
fi
exit "$status"
