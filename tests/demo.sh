#!/usr/bin/env bash
# `make run`: what the emissary does, then the whole story with its node agent.
# Everything runs on this machine: the agent's store is a local directory, its events go to
# a file; no cluster, no servers to set up.
set -euo pipefail
E=${EMISSARY_BIN:?set EMISSARY_BIN to the emissary binary}
A=${AGENT_BIN:?set AGENT_BIN to the emissary-agent binary}
work=$(mktemp -d)
agent_pid=
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    [ -n "${tail_pid:-}" ] && kill "$tail_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
scene() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; }

printf '\033[1mPart 1: the supervisor\033[0m\n'

scene "1. Run a command: its output passes through and is captured; its exit code is ours"
show "emissary run --log-dir logs --summary summary.json -- sh -c 'echo ...; echo ... >&2; exit 3'"
set +e
"$E" run --log-dir "$work/logs" --summary "$work/summary.json" -- \
    sh -c 'echo "hello from stdout"; echo "hello from stderr" >&2; exit 3'
echo "exit code: $?"
set -e
for f in stdout stderr combined exitcode; do printf '  %-9s %s\n' "$f:" "$(tr '\n' ' ' < "$work/logs/$f")"; done
printf '  summary:  %s\n' "$(tr -d '\n ' < "$work/summary.json" | cut -c1-150)..."

scene "2. Forward a signal to the command's whole process group"
show "emissary run --log-dir sig -- sh -c 'trap ... USR1; ...' &   emissary signal --dir sig USR1"
"$E" run --log-dir "$work/sig" -- \
    sh -c 'trap "echo caught SIGUSR1, exiting 42; exit 42" USR1; echo "waiting for a signal"; while :; do sleep 0.05; done' &
pid=$!
while [ ! -p "$work/sig/signal" ]; do sleep 0.01; done
sleep 0.2
"$E" signal --dir "$work/sig" USR1
set +e; wait $pid 2>/dev/null; echo "exit code: $?"; set -e

scene "3. Enforce a deadline: SIGTERM, then SIGKILL after the grace period; exit 124"
show "emissary run --deadline 500ms --grace 300ms -- sh -c 'trap \"\" TERM; sleep 30'"
set +e
start=$(date +%s%N)
"$E" run --deadline 500ms --grace 300ms -- sh -c 'trap "" TERM; echo "ignoring SIGTERM"; sleep 30'
code=$?
echo "exit code: $code after $(( ($(date +%s%N) - start) / 1000000 )) ms"
set -e

printf '\n\033[1mPart 2: two workflow steps passing an artifact through the node agent\033[0m\n'

scene "4. Start the node agent (local store, events to a file)"
head -c 32 /dev/urandom | base64 > "$work/node-secret"
show "emissary-agent serve --data-dir agent --secret-file node-secret --listen 127.0.0.1:0 ..."
"$A" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$work/agent" \
    --secret-file "$work/node-secret" --node demo-node --ready-file "$work/ready.json" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 200); do [ -s "$work/ready.json" ] && break; sleep 0.05; done
api=$(sed 's/.*"api":"\([^"]*\)".*/\1/' "$work/ready.json")
echo "agent listening on $api"
touch "$work/agent/events.jsonl"
# Print each event as the agent delivers it.
tail -n +1 -f "$work/agent/events.jsonl" 2>/dev/null | while read -r line; do
    task=$(sed 's/.*"task_id":"\([^"]*\)".*/\1/' <<<"$line")
    seq=$(sed 's/.*"seq":\([0-9]*\).*/\1/' <<<"$line")
    phase=$(sed 's/.*"phase":"\([^"]*\)".*/\1/' <<<"$line")
    printf '    \033[36mevent\033[0m %-9s seq %s  %s\n' "$task" "$seq" "$phase"
done &
tail_pid=$!

step() { # task spec.json
    local task=$1 spec=$2
    show "EMISSARY_AGENT_ADDR=$api EMISSARY_TASK_ID=$task EMISSARY_TOKEN=... emissary run --template $(basename "$spec")"
    EMISSARY_AGENT_ADDR=$api EMISSARY_TASK_ID=$task EMISSARY_ATTEMPT=0 \
    EMISSARY_TOKEN=$("$A" token --secret-file "$work/node-secret" --task "$task" --attempt 0 --workflow demo --ttl 10m) \
        "$E" run --template "$spec" --root "$work/$task"
}

scene "5. Step 'generate': a script writes a directory; it is packed (tar+zstd) and stored"
cat > "$work/generate.json" <<EOF
{"name": "generate",
 "script": {"command": ["sh"], "source": "mkdir -p $work/report && seq 1 1000 > $work/report/numbers && date -u > $work/report/when && echo 1000 > $work/count && echo generated"},
 "outputs": {"parameters": [{"name": "count", "valueFrom": {"path": "$work/count"}}],
             "artifacts": [{"name": "report", "path": "$work/report", "archive": {"zstd": {}}}]}}
EOF
step generate "$work/generate.json"
sleep 1.2
key=$(grep '"generate"' "$work/agent/events.jsonl" | grep -o '"key":"[^"]*"' | head -1 | cut -d'"' -f4)
echo "the artifact's store key: $key"

scene "6. Step 'consume': its input is fetched by key through the agent and unpacked in place"
cat > "$work/consume.json" <<EOF
{"name": "consume",
 "inputs": {"artifacts": [{"name": "report", "path": "$work/input", "key": "$key"}]},
 "container": {"command": ["sh", "-c", "echo sum of the numbers: \$(awk '{s+=\$1} END {print s}' $work/input/numbers)"]}}
EOF
step consume "$work/consume.json"
sleep 1.2

scene "7. What the controller would get, and where the artifact is"
echo "outputs.json of 'generate':"
sed 's/^/    /' "$work/generate/outputs.json" | head -30
echo "the artifact in the agent's store:"
find "$work/agent/store" -type f | sed "s|$work|    <tmp>|"
echo "events delivered: $(wc -l < "$work/agent/events.jsonl") (in $work/agent/events.jsonl; with --controller-url they are POSTed)"
