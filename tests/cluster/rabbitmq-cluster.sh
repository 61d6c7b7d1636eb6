#!/usr/bin/env bash
# A real 3-node RabbitMQ cluster on loopback, beside the default node (5672), for the cluster tests:
#   rabbitmq-cluster.sh start            start nodes c1 c2 c3 (AMQP 5681 5682 5683), join them, wait until formed
#   rabbitmq-cluster.sh stop             stop the nodes this script started (by pid), remove their data
#   rabbitmq-cluster.sh kill NODE        SIGKILL one node (c1, c2 or c3)
#   rabbitmq-cluster.sh stop-node NODE   stop one node gracefully
#   rabbitmq-cluster.sh restart NODE     start a killed or stopped node again (it rejoins: same data dir)
#   rabbitmq-cluster.sh urls             print the AMQP URLs, comma-separated
#   rabbitmq-cluster.sh leader QUEUE     print the node (c1, c2 or c3) that leads quorum queue QUEUE
#   rabbitmq-cluster.sh status           cluster status as node c1 (or the first running node) sees it
# Each node has its own name (rabbit-cN@localhost), ports, data and log dirs and config, and the cluster its
# own Erlang cookie, all under RABBITMQ_CLUSTER_DIR (default /tmp/bus-rabbitmq-cluster). Only the pids this
# script recorded there are ever signalled.
set -euo pipefail

DIR=${RABBITMQ_CLUSTER_DIR:-/tmp/bus-rabbitmq-cluster}
NODES=(c1 c2 c3)
# The broker's own scripts: Debian's /usr/sbin wrappers switch to the rabbitmq user and drop the environment
# (node name, ports, HOME and so the cookie) that sets these nodes apart.
if [ -z "${RABBITMQ_BIN:-}" ]; then
  if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then RABBITMQ_BIN=/usr/lib/rabbitmq/bin
  else RABBITMQ_BIN=$(dirname "$(command -v rabbitmq-server)"); fi
fi

port_of() { case $1 in c1) echo 5681 ;; c2) echo 5682 ;; c3) echo 5683 ;; *) echo "unknown node $1 (c1, c2 or c3)" >&2; exit 2 ;; esac; }
name_of() { echo "rabbit-$1@localhost"; }

# Environment of node $1 (also for rabbitmqctl talking to it: same HOME, same cookie).
node_env() {
  local node=$1 port
  port=$(port_of "$node")
  echo HOME="$DIR" \
    RABBITMQ_NODENAME="$(name_of "$node")" \
    RABBITMQ_NODE_PORT="$port" \
    RABBITMQ_DIST_PORT="$((port + 20000))" \
    RABBITMQ_CONFIG_FILE="$DIR/$node/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$DIR/$node/mnesia" \
    RABBITMQ_LOG_BASE="$DIR/$node/log" \
    RABBITMQ_PID_FILE="$DIR/$node/pid"
}

ctl() {
  local node=$1
  shift
  env $(node_env "$node") "$RABBITMQ_BIN/rabbitmqctl" -n "$(name_of "$node")" "$@"
}

running() {
  local pidfile="$DIR/$1/pid"
  [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

start_node() {
  local node=$1
  mkdir -p "$DIR/$node/mnesia" "$DIR/$node/log"
  printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users = none\n' "$(port_of "$node")" > "$DIR/$node/rabbitmq.conf"
  if running "$node"; then return 0; fi
  env $(node_env "$node") "$RABBITMQ_BIN/rabbitmq-server" -detached
  # The pid file appears once the VM is up; then wait for the broker to boot.
  for _ in $(seq 1 120); do [ -s "$DIR/$node/pid" ] && break; sleep 0.5; done
  ctl "$node" wait --timeout 120 "$DIR/$node/pid" >/dev/null
  ctl "$node" await_startup >/dev/null
}

case ${1:-} in
  start)
    mkdir -p "$DIR"
    if [ ! -s "$DIR/.erlang.cookie" ]; then
      head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/.erlang.cookie"
      chmod 400 "$DIR/.erlang.cookie"
    fi
    echo '[].' > "$DIR/enabled_plugins"
    start_node c1
    for node in c2 c3; do
      start_node "$node"
      if ! ctl "$node" cluster_status 2>/dev/null | grep -q "$(name_of c1)"; then
        ctl "$node" stop_app >/dev/null
        ctl "$node" join_cluster "$(name_of c1)" >/dev/null
        ctl "$node" start_app >/dev/null
      fi
    done
    ctl c1 await_online_nodes 3 --timeout 120 >/dev/null
    echo "cluster up: $("$0" urls)"
    ;;
  stop)
    for node in "${NODES[@]}"; do
      if running "$node"; then
        pid=$(cat "$DIR/$node/pid")
        ctl "$node" stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
      fi
    done
    rm -rf "$DIR"
    ;;
  kill)
    node=${2:?node}
    port_of "$node" >/dev/null
    if running "$node"; then kill -9 "$(cat "$DIR/$node/pid")"; fi
    ;;
  stop-node)
    node=${2:?node}
    if running "$node"; then
      pid=$(cat "$DIR/$node/pid")
      ctl "$node" stop >/dev/null
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    ;;
  restart)
    node=${2:?node}
    if running "$node"; then kill -9 "$(cat "$DIR/$node/pid")"; sleep 1; fi
    rm -f "$DIR/$node/pid"
    start_node "$node"
    ;;
  urls)
    urls=()
    for node in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$(port_of "$node")/%2f"); done
    (IFS=,; echo "${urls[*]}")
    ;;
  leader)
    queue=${2:?queue}
    for node in "${NODES[@]}"; do
      if running "$node"; then
        leader=$(ctl "$node" list_queues name leader --no-table-headers --quiet 2>/dev/null | awk -v q="$queue" '$1 == q { print $2 }')
        if [ -n "$leader" ]; then
          leader=${leader#rabbit-}
          echo "${leader%@*}"
          exit 0
        fi
      fi
    done
    echo "no leader found for $queue" >&2; exit 1
    ;;
  status)
    for node in "${NODES[@]}"; do
      if running "$node"; then ctl "$node" cluster_status; exit 0; fi
    done
    echo "no node running" >&2; exit 1
    ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
