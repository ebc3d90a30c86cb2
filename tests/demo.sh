#!/usr/bin/env bash
# `make run`: what the emissary does, in four short scenes.
set -euo pipefail
E=${EMISSARY_BIN:?set EMISSARY_BIN to the emissary binary}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
scene() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; }

scene "1. Run a command: its stdout and stderr pass through and are captured; its exit code is ours"
show "emissary run --log-dir $work/logs --summary $work/summary.json -- sh -c '...; exit 3'"
set +e
"$E" run --log-dir "$work/logs" --summary "$work/summary.json" -- \
    sh -c 'echo "hello from stdout"; echo "hello from stderr" >&2; exit 3'
echo "exit code: $?"
set -e
for f in stdout stderr combined exitcode; do printf '%-9s %s\n' "$f:" "$(tr '\n' ' ' < "$work/logs/$f")"; done

scene "2. Forward a signal: 'emissary signal' reaches the command's whole process group"
show "emissary run --log-dir $work/sig -- sh -c 'trap ... USR1; while :; do sleep 0.05; done' &  emissary signal --dir $work/sig USR1"
"$E" run --log-dir "$work/sig" -- \
    sh -c 'trap "echo caught SIGUSR1, exiting 42; exit 42" USR1; echo "waiting for a signal"; while :; do sleep 0.05; done' &
pid=$!
while [ ! -p "$work/sig/signal" ]; do sleep 0.01; done
sleep 0.2
"$E" signal --dir "$work/sig" USR1
set +e; wait $pid; echo "exit code: $?"; set -e

scene "3. Enforce a deadline: SIGTERM to the group, SIGKILL after the grace period, exit 124"
show "emissary run --deadline 500ms --grace 300ms -- sh -c 'trap \"\" TERM; sleep 30'"
set +e
start=$(date +%s%N)
"$E" run --deadline 500ms --grace 300ms -- sh -c 'trap "" TERM; echo "ignoring SIGTERM"; sleep 30'
code=$?
echo "exit code: $code after $(( ($(date +%s%N) - start) / 1000000 )) ms"
set -e

scene "4. The run summary of scene 1 (written atomically)"
cat "$work/summary.json"
