#!/usr/bin/env bash
# A make SHELL that times each recipe line: `make steer STEER=/tmp/steer SHELL=bench/step_times.sh`
# appends "SECONDS  COMMAND" per line to $STEP_TIMES (default /tmp/step_times.log). This is how the
# README's `make steer` step timings were taken.
start=$(date +%s.%N)
/bin/bash "$@"
rc=$?
end=$(date +%s.%N)
printf '%7.1f s  %s\n' "$(echo "$end - $start" | bc)" "$(echo "${*: -1}" | head -c 150 | tr '\n' ' ')" \
    >> "${STEP_TIMES:-/tmp/step_times.log}"
exit $rc
