#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine for development and tests: one head and N worker
# raylets, each with its own CPUs/GPUs/custom resources, all on 127.0.0.1.
#
#   cluster/local-cluster.sh start [--workers N] [--head-cpus C] [--worker-cpus C] [--worker-gpus G]
#                                  [--worker-resources JSON] [--port P] [--dashboard-port D] [--dir DIR]
#   cluster/local-cluster.sh stop  [--dir DIR]
#
# Every node gets the custom resource node_head or node_worker_K, so work can be pinned or checked.
# Worker processes take ports 20000-20999 (head) and 21000+1000K.. (worker K): below Linux's ephemeral range
# (32768-60999), where free ports for --port/--dashboard-port and the agents (dashboard port + 100 + K) come from.
# Ray binds to the machine's interface address when it has one; run this inside a network namespace
# with only loopback (scripts/loopback-only bash) to keep all traffic on 127.0.0.1.
# Token auth (Ray >= 2.52) is on: clients need RAY_AUTH_MODE=token and ~/.ray/auth_token.
# `stop` ends only this cluster's processes (those whose command line names its --dir), never other
# Ray sessions on the machine.
set -euo pipefail
cmd=${1:-}; shift || true
workers=1; head_cpus=1; worker_cpus=1; worker_gpus=0; worker_resources='{}'
port=26379; dash=28265; dir=/tmp/fpnray
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --head-cpus) head_cpus=$2; shift 2 ;;
    --worker-cpus) worker_cpus=$2; shift 2 ;;
    --worker-gpus) worker_gpus=$2; shift 2 ;;
    --worker-resources) worker_resources=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dashboard-port) dash=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
RAY=${RAY:-$(command -v ray || echo ray)}
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
# Each raylet keeps up to 8 idle workers (Ray's default: one per CPU; jobs.runner.kept_workers: one per decode task
# its CPUs hold, + 4, for the tests' 1-CPU nodes and decode 0.25). With 1-CPU nodes and tasks reserving fractions of a
# CPU (decode 0.25, write 0.1), Ray ended each task's worker once idle and the next task started a fresh one
# (27 workers for a 240-frame job, 17 on the head), importing Ray Data again: that job took ~140 s, 60 s with this.
export RAY_num_workers_soft_limit=${RAY_num_workers_soft_limit:-8}

merge() {  # merge() BASE_JSON EXTRA_JSON -> one JSON object
  python3 -c 'import json,sys; a=json.loads(sys.argv[1]); a.update(json.loads(sys.argv[2])); print(json.dumps(a))' "$1" "$2"
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    "$RAY" start --head --node-ip-address 127.0.0.1 --port "$port" --dashboard-host 127.0.0.1 \
      --dashboard-port "$dash" --num-cpus "$head_cpus" --num-gpus 0 --temp-dir "$dir" \
      --resources '{"node_head": 1}' --min-worker-port 20000 --max-worker-port 20999 \
      --ray-client-server-port $((port + 1)) --dashboard-agent-listen-port $((dash + 100)) >"$dir/head.log" 2>&1
    for k in $(seq 1 "$workers"); do
      "$RAY" start --address "127.0.0.1:$port" --node-ip-address 127.0.0.1 --num-cpus "$worker_cpus" \
        --num-gpus "$worker_gpus" --resources "$(merge "$worker_resources" "{\"node_worker_$k\": 1}")" \
        --min-worker-port $((21000 + 1000 * k)) --max-worker-port $((21999 + 1000 * k)) \
        --dashboard-agent-listen-port $((dash + 100 + k)) >"$dir/worker-$k.log" 2>&1
    done
    echo "head 127.0.0.1:$port, dashboard http://127.0.0.1:$dash, $workers worker(s); logs in $dir"
    ;;
  stop)
    # the cluster's processes name its --dir or its GCS address; their children (workers, agents) follow
    roots=$( (pgrep -f -- "$dir" || true; pgrep -f -- "127.0.0.1:$port" || true) | sort -u | grep -vx "$$" || true)
    all=""
    while [ -n "$roots" ]; do
      all="$all $roots"
      roots=$(for p in $roots; do pgrep -P "$p" || true; done)
    done
    [ -n "${all// }" ] && kill $all 2>/dev/null || true
    sleep 2
    [ -n "${all// }" ] && kill -9 $all 2>/dev/null || true
    echo "stopped the cluster in $dir"
    ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
