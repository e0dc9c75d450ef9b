#!/usr/bin/env bash
# An emulated multi-node cluster on one machine: K network namespaces ("nodes"), each with its own
# address on a private bridge, every node's link capped by a token-bucket filter (tc tbf), and one
# torchrun per node running slowmo-train across them (c10d rendezvous on node 0).
#
#   sudo scripts/emulated_cluster.sh --nodes 2 --nproc 2 --rate 200mbit -- \
#       task=cifar10 algorithm=sgp slowmo.enabled=true launcher.threads_per_worker=1 data.root=...
#   sudo scripts/emulated_cluster.sh --cleanup          # remove leftovers of an interrupted run
#
# Layout (nothing touches the host's own network namespace except the namespace names):
#   namespace <prefix>-sw   a bridge <prefix>br; one veth end <prefix>h<i> per node, shaped (node's download)
#   namespace <prefix>-n<i> veth end <prefix>n<i> with address <subnet>.<i+1>/24, shaped (node's upload)
# Each direction of a node's link is limited to --rate, so a node sends and receives at most --rate.
# Workers use that interface for Gloo (GLOO_SOCKET_IFNAME) and torchrun binds to its address.
#
# Output of node i is streamed with the prefix "[node i]". The script waits for every node, stops the
# others as soon as one fails, and exits non-zero if any node failed. Every namespace and link it made
# is removed on exit, failure, Ctrl-C or SIGTERM (trap), and at start-up it removes leftovers of an
# earlier run with the same --prefix. Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2.
set -euo pipefail

NODES=2
NPROC=1
RATE=100mbit        # tc rate syntax: kbit, mbit, gbit; "none" = no cap
BURST=""            # tbf bucket; default: 12 ms of traffic at RATE, at least 32 kb
LATENCY=50ms        # tbf queue: packets wait at most this long before being dropped
PORT=29500
PREFIX=smt
SUBNET=10.77.0
PYTHON=""
CLEANUP_ONLY=0
MODULE=slowmo_train

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF
Options:
  --nodes K        number of nodes (default $NODES)
  --nproc P        processes per node (torchrun --nproc_per_node; default $NPROC)
  --rate R         link rate per node and direction, tc syntax (default $RATE; "none" = unlimited)
  --burst B        tbf burst (default: 12 ms of traffic at the rate, >= 32kb)
  --latency L      tbf latency / queue length (default $LATENCY)
  --port N         rendezvous port on node 0 (default $PORT)
  --prefix S       name prefix of namespaces and links (default $PREFIX; <= 8 characters)
  --subnet A.B.C   /24 used inside the namespaces (default $SUBNET)
  --python PATH    interpreter with slowmo-train installed (default: the checkout's .venv, else python3)
  --module M       python module torchrun runs (default $MODULE)
  --cleanup        only remove leftovers of an earlier run with this prefix, then exit
Everything after "--" is passed to slowmo-train (Hydra overrides).
EOF
}

die() { echo "emulated_cluster: error: $*" >&2; exit 2; }

TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) NODES=$2; shift 2 ;;
        --nproc) NPROC=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --burst) BURST=$2; shift 2 ;;
        --latency) LATENCY=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --subnet) SUBNET=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --module) MODULE=$2; shift 2 ;;
        --cleanup) CLEANUP_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; TRAIN_ARGS=("$@"); break ;;
        *) die "unknown option '$1' (Hydra overrides go after '--'; see --help)" ;;
    esac
done

[[ "$NODES" =~ ^[0-9]+$ && "$NODES" -ge 1 && "$NODES" -le 200 ]] || die "--nodes=$NODES must be an integer in [1, 200]"
[[ "$NPROC" =~ ^[0-9]+$ && "$NPROC" -ge 1 ]] || die "--nproc=$NPROC must be an integer >= 1"
[[ "$PREFIX" =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "--prefix=$PREFIX must be 1-8 lower-case letters/digits starting with a letter (interface names are limited to 15 characters)"
[[ "$SUBNET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--subnet=$SUBNET must look like 10.77.0 (the first three octets of a /24)"
[[ "$RATE" == none || "$RATE" =~ ^[0-9.]+([kmg]?bit|[kmg]?bps)$ ]] || die "--rate=$RATE must be a tc rate such as 100mbit or 'none'"
command -v ip >/dev/null || die "iproute2 is missing (the 'ip' command); install it: apt-get install -y iproute2"
command -v tc >/dev/null || die "iproute2's 'tc' command is missing; install it: apt-get install -y iproute2"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$HERE/../.venv/bin/python" ]]; then PYTHON="$HERE/../.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
# absolute, but not symlink-resolved: a venv's python must be called through the venv's path
[[ "$PYTHON" = /* ]] || PYTHON="$PWD/$PYTHON"
[[ -x "$PYTHON" ]] || die "--python=$PYTHON is not an executable interpreter"

SWITCH="$PREFIX-sw"
BRIDGE="${PREFIX}br"
node_ns() { echo "$PREFIX-n$1"; }
node_if() { echo "${PREFIX}n$1"; }
host_if() { echo "${PREFIX}h$1"; }
node_addr() { echo "$SUBNET.$(($1 + 1))"; }

# Remove every namespace named <prefix>-* (ours, possibly from an interrupted run): stop the
# processes still inside first, since deleting a namespace's name does not end them. Deleting a
# namespace deletes the veth ends inside it, and with them their peers and the bridge.
cleanup_namespaces() {
    local ns pids
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}-(sw|n[0-9]+)$" || true); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [[ -n "$pids" ]]; then
            kill -TERM $pids 2>/dev/null || true
            sleep 1
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [[ -z "$pids" ]] || kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf /etc/netns/"$PREFIX"-n[0-9]* 2>/dev/null || true
    rmdir /etc/netns 2>/dev/null || true  # only if empty (other tools may keep files there)
    # veth ends left in the host namespace by a run interrupted half-way through setup
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${PREFIX}(h|n)[0-9]+$|^${PREFIX}br$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
}

if [[ $CLEANUP_ONLY -eq 1 ]]; then
    cleanup_namespaces
    echo "emulated_cluster: removed namespaces and links with prefix '$PREFIX'"
    exit 0
fi
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "no slowmo-train arguments; put Hydra overrides after '--' (see --help)"

NODE_PIDS=()
on_exit() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${NODE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    cleanup_namespaces
    exit "$status"
}
on_signal() { echo "emulated_cluster: interrupted; stopping the nodes" >&2; exit 130; }
trap on_exit EXIT
trap on_signal INT TERM

cleanup_namespaces  # leftovers of an earlier interrupted run with this prefix

# The bucket must refill faster than the kernel's timer tick drains it, or TCP never reaches the
# rate (measured with a 2.8 MB exchange at 60mbit: a 32 kb bucket gives 52 Mbit/s of payload, 100 kb
# gives 57.4 = the rate x 1448/1514, i.e. TCP/IP/Ethernet headers only, 300 kb lets bursts beat the
# rate: 63.5). 12 ms of traffic sits at the measured sweet spot.
tbf_burst() {
    if [[ -n "$BURST" ]]; then echo "$BURST"; return; fi
    local bits
    bits=$("$PYTHON" - "$RATE" <<'EOF'
import re, sys
m = re.fullmatch(r"([0-9.]+)([kmg]?)(bit|bps)", sys.argv[1])
scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] * (8 if m.group(3) == "bps" else 1)
print(int(float(m.group(1)) * scale))
EOF
)
    local bytes=$((bits / 8 * 12 / 1000))
    ((bytes < 32768)) && bytes=32768
    echo "${bytes}b"
}

shape() {  # shape <namespace> <interface>
    [[ "$RATE" == none ]] && return
    ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst "$(tbf_burst)" latency "$LATENCY"
}

# ip netns exec bind-mounts /etc/netns/<ns>/hosts over /etc/hosts: naming the node addresses there
# lets Gloo and c10d resolve peers' addresses to names instead of warning on every connection.
write_hosts() {
    mkdir -p "/etc/netns/$1"
    {
        echo "127.0.0.1 localhost"
        for ((j = 0; j < NODES; j++)); do echo "$(node_addr "$j") $(node_ns "$j")"; done
    } > "/etc/netns/$1/hosts"
}

ip netns add "$SWITCH"
ip -n "$SWITCH" link add "$BRIDGE" type bridge
ip -n "$SWITCH" link set "$BRIDGE" up
ip -n "$SWITCH" link set lo up
for ((i = 0; i < NODES; i++)); do
    ns=$(node_ns "$i"); nif=$(node_if "$i"); hif=$(host_if "$i")
    ip netns add "$ns"
    write_hosts "$ns"
    ip -n "$SWITCH" link add "$hif" type veth peer name "$nif" netns "$ns"
    ip -n "$SWITCH" link set "$hif" master "$BRIDGE" up
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev "$nif"
    ip -n "$ns" link set "$nif" up
    ip -n "$ns" link set lo up
    # Algorithms alternate compute and bursts of communication; by default TCP shrinks its window
    # after an idle period longer than the retransmission timeout and ramps up again for every burst
    # (RFC 2861), so each burst starts below the link rate (measured: a 2.8 MB all-reduce at 45mbit
    # took 667-707 ms with it, 560-634 ms without; 522 ms is the rate). Clusters running collective
    # communication usually turn it off; the sysctl is per namespace, so the host is not touched.
    ip netns exec "$ns" sysctl -qw net.ipv4.tcp_slow_start_after_idle=0
    shape "$ns" "$nif"          # what the node sends
    shape "$SWITCH" "$hif"      # what the node receives
done
echo "emulated_cluster: $NODES node(s) x $NPROC process(es), link $RATE per node and direction" \
     "(tbf burst $([[ $RATE == none ]] && echo - || tbf_burst)), rendezvous $(node_addr 0):$PORT"

RUN_ID="${PREFIX}-$$-$(date +%s)"
for ((i = 0; i < NODES; i++)); do
    ns=$(node_ns "$i")
    host_flag=$([[ $i -eq 0 ]] && echo 1 || echo 0)
    # The namespaces share this machine's hostname, so torchrun cannot tell by name which node hosts
    # the rendezvous store (is_host) nor which address the others reach it at (--local_addr).
    ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$(node_if "$i")" PYTHONUNBUFFERED=1 \
        "$PYTHON" -m torch.distributed.run \
        --nnodes="$NODES" --nproc_per_node="$NPROC" --node_rank="$i" \
        --rdzv_backend=c10d --rdzv_endpoint="$(node_addr 0):$PORT" --rdzv_id="$RUN_ID" \
        --rdzv_conf="is_host=$host_flag" --local_addr="$(node_addr "$i")" --max_restarts=0 \
        -m "$MODULE" "${TRAIN_ARGS[@]}" \
        > >(sed -u "s/^/[node $i] /") 2>&1 &
    NODE_PIDS+=($!)
done

# Wait for every node; the first failure stops the others (they would otherwise block in a
# collective until the process-group timeout).
failed=0
declare -A RUNNING=()
for ((i = 0; i < ${#NODE_PIDS[@]}; i++)); do RUNNING[${NODE_PIDS[$i]}]=$i; done
while ((${#RUNNING[@]} > 0)); do
    set +e
    wait -n -p done_pid "${!RUNNING[@]}"
    status=$?
    set -e
    [[ -n "${done_pid:-}" ]] || break
    node=${RUNNING[$done_pid]}
    unset "RUNNING[$done_pid]" done_pid
    if ((status != 0)); then
        echo "emulated_cluster: node $node failed (exit $status)" >&2
        if ((failed == 0)); then
            for pid in "${!RUNNING[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        fi
        failed=1
    fi
done
sleep 0.2  # let the prefixing filters print the last lines
if ((failed)); then
    echo "emulated_cluster: FAILED" >&2
    exit 1
fi
echo "emulated_cluster: all $NODES node(s) finished"
