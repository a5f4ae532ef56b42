#!/usr/bin/env bash
# The promguard demo in one command: a real Prometheus (the last 2 days at 30 s) and a
# real VictoriaMetrics (3 years: 1 h samples, the last 2 days at 30 s) loaded with a
# synthetic shop's metrics, both scraping it live, and promguard in front of them with
# the shipped sale-mode policies (policies/) and the demo's configuration
# (scripts/demo.yaml: an admin token, Grafana trusted as its data source would send).
#
#   scripts/demo.sh [--port 9091] [--prometheus-port 9090] [--vm-port 8428]
#       [--exporter-port 9200] [--dir /tmp/promguard-demo] [--recent 2d] [--long-term 3y]
#       [--bin-dir DIR]
#
# Every option can also be set in the environment: PROMGUARD_DEMO_PORT,
# PROMGUARD_DEMO_PROMETHEUS_PORT, PROMGUARD_DEMO_VM_PORT, PROMGUARD_DEMO_EXPORTER_PORT,
# PROMGUARD_DEMO_DIR, PROMGUARD_DEMO_RECENT, PROMGUARD_DEMO_LONG_TERM,
# PROMGUARD_DEMO_BIN_DIR. --bin-dir runs the promguard and demo-data found there instead
# of building them (cargo build --release).
#
# Run it as root or with sudo on a fresh Debian/Ubuntu machine: it installs prometheus
# and victoria-metrics with apt-get if they are missing. It prints the URLs and commands
# to try, then a line of promguard's counters every 10 s, until Ctrl-C stops everything
# it started. Data, logs (promguard's too), pids and promguard's sale-mode state go to
# the demo directory; nothing is written to the checkout but cargo's build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
readonly REPO
readonly ADMIN_TOKEN=demo-admin-token GRAFANA_SECRET=demo-grafana-secret

log() { printf 'demo.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
usage() {
  sed -n '8,10s/^#   //p' "$0" >&2
  exit 2
}

port=${PROMGUARD_DEMO_PORT:-9091}
prometheus_port=${PROMGUARD_DEMO_PROMETHEUS_PORT:-9090}
vm_port=${PROMGUARD_DEMO_VM_PORT:-8428}
exporter_port=${PROMGUARD_DEMO_EXPORTER_PORT:-9200}
dir=${PROMGUARD_DEMO_DIR:-/tmp/promguard-demo}
recent=${PROMGUARD_DEMO_RECENT:-2d}
long_term=${PROMGUARD_DEMO_LONG_TERM:-3y}
bin_dir=${PROMGUARD_DEMO_BIN_DIR:-}
while (($# > 0)); do
  case $1 in
    -h | --help) usage ;;
  esac
  (($# >= 2)) || die "$1 needs a value"
  case $1 in
    --port) port=$2 ;;
    --prometheus-port) prometheus_port=$2 ;;
    --vm-port) vm_port=$2 ;;
    --exporter-port) exporter_port=$2 ;;
    --dir) dir=$2 ;;
    --recent) recent=$2 ;;
    --long-term) long_term=$2 ;;
    --bin-dir) bin_dir=$2 ;;
    *) die "unknown option $1 (see $0 --help)" ;;
  esac
  shift 2
done

# Port $1, for $2, set with flag $3 or variable $4: a number, and free.
check_port() {
  [[ $1 =~ ^[0-9]+$ ]] && (($1 > 0 && $1 < 65536)) || die "$3: '$1' is not a port number"
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    die "port $1 ($2) on 127.0.0.1 is in use: choose another with $3 N or $4=N"
  fi
}

install_backends() {
  # python3-venv is not needed by the demo but by `cargo test` (the chart check), the
  # README's other command; installing it here makes both work on a fresh machine.
  if command -v promtool >/dev/null && command -v victoria-metrics >/dev/null &&
    command -v curl >/dev/null && python3 -c 'import ensurepip' 2>/dev/null; then
    return
  fi
  local sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || die "installing prometheus and victoria-metrics needs root or sudo"
    sudo=(sudo)
  fi
  log "installing prometheus, victoria-metrics, curl and python3-venv with apt-get"
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    prometheus victoria-metrics curl ca-certificates python3 python3-venv
  # The packages start system services on 9090 and 8428, the demo's default ports.
  if [[ -d /run/systemd/system ]]; then
    log "stopping and disabling the packaged prometheus and victoria-metrics services"
    "${sudo[@]}" systemctl disable --now prometheus victoria-metrics
  fi
}

# Stops promguard, then the backends; runs on every exit, Ctrl-C included.
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n ${promguard_pid:-} ]] && kill -0 "$promguard_pid" 2>/dev/null; then
    log "stopping promguard"
    kill -TERM "$promguard_pid" 2>/dev/null || true
    wait "$promguard_pid" 2>/dev/null || true
  fi
  scripts/backends.sh stop --dir "$dir"
  exit "$status"
}

# One line of promguard's counters, from its /metrics.
summary() {
  curl -fsS --max-time 5 "$pg/metrics" | awk '
    /^promguard_http_requests_total/ { requests += $NF }
    /^promguard_cache_lookups_total/ { lookups += $NF }
    /^promguard_cache_lookups_total.*outcome="hit"/ { hits += $NF }
    /^promguard_upstream_request_duration_seconds_count/ { calls += $NF }
    /^promguard_policy_rejections_total/ { refused += $NF }
    /^promguard_limit_rejections_total/ { limited += $NF }
    /^promguard_sale_mode\{/ { if ($NF == 1) sale = "on" }
    END {
      printf "requests %d, cache hits %d of %d lookups, backend calls %d, refused by policy %d, by limits %d, sale mode %s\n",
        requests, hits, lookups, calls, refused, limited, sale == "" ? "off" : sale
    }'
}

began=$SECONDS
check_port "$port" promguard --port PROMGUARD_DEMO_PORT
check_port "$prometheus_port" Prometheus --prometheus-port PROMGUARD_DEMO_PROMETHEUS_PORT
check_port "$vm_port" VictoriaMetrics --vm-port PROMGUARD_DEMO_VM_PORT
check_port "$exporter_port" "the demo-data exporter" --exporter-port PROMGUARD_DEMO_EXPORTER_PORT
install_backends
if [[ -z $bin_dir ]]; then
  command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain first"
  log "building (cargo build --release; the first build takes a few minutes)"
  cargo build --release
  # Wherever cargo puts it: CARGO_TARGET_DIR and .cargo/config.toml may move it.
  target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  [[ -n $target_dir ]] || die "cargo metadata named no target directory"
  bin_dir=$target_dir/release
fi
bin_dir=$(cd "$bin_dir" 2>/dev/null && pwd) || die "--bin-dir: no such directory"
bin=$bin_dir/promguard
[[ -x $bin ]] || die "$bin not found"
built=$SECONDS

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

urls=$(scripts/backends.sh start --dir "$dir" --prom-port "$prometheus_port" --vm-port "$vm_port" \
  --exporter-port "$exporter_port" --recent "$recent" --long-term "$long_term" --bin-dir "$bin_dir")
url() { sed -n "s/^$1=//p" <<<"$urls"; }
PROMETHEUS_URL=$(url PROMETHEUS_URL)
VM_URL=$(url VM_URL)
EXPORTER_URL=$(url EXPORTER_URL)
loaded=$SECONDS

pg=http://127.0.0.1:$port
mkdir -p "$dir/state"
"$bin" serve --config scripts/demo.yaml --listen "127.0.0.1:$port" --recent-url "$PROMETHEUS_URL" \
  --recent-window "$recent" --long-term-url "$VM_URL" --state-file "$dir/state/sale-mode.json" \
  >"$dir/promguard.log" 2>&1 &
promguard_pid=$!
deadline=$((SECONDS + 30))
until curl -fsS -o /dev/null --max-time 2 "$pg/-/ready" 2>/dev/null; do
  kill -0 "$promguard_pid" 2>/dev/null || die "promguard exited; see $dir/promguard.log:
$(tail -n 5 "$dir/promguard.log")"
  ((SECONDS < deadline)) || die "promguard is not ready on $pg after 30 s; see $dir/promguard.log"
  sleep 0.2
done
# The promguard dashboard shows promguard's own metrics: list it for Prometheus to scrape.
printf '[{"targets": ["127.0.0.1:%s"], "labels": {"job": "promguard"}}]\n' "$port" \
  >"$(url PROMGUARD_TARGETS_DIR)/demo.json"

# The 30-day panels end on the hour, as Grafana aligns a panel to its step.
hour=$(($(date +%s) / 3600 * 3600))
q() { printf '%q' "$1"; }
month="$(q "$pg/api/v1/query_range") --data-urlencode 'query=sum(increase(shop_orders_total{status=\"created\"}[1h]))' -d start=$((hour - 30 * 86400)) -d end=$hour -d step=3600"
paid="$(q "$pg/api/v1/query_range") --data-urlencode 'query=sum(increase(shop_orders_total{status=\"paid\"}[1h]))' -d start=$((hour - 30 * 86400)) -d end=$hour -d step=3600"
admin="--url $pg --token $ADMIN_TOKEN"
cat <<EOF

promguard demo is running; Ctrl-C stops everything. Ready in $((SECONDS - began)) s (build $((built - began)) s, data $((loaded - built)) s).
  promguard        $pg
  Prometheus       $PROMETHEUS_URL   (the last $recent, 30 s samples)
  VictoriaMetrics  $VM_URL   (the last $long_term: 1 h samples, the last $recent at 30 s, plus live ones)
  demo-data        $EXPORTER_URL/metrics
  logs             $dir/promguard.log (promguard), $dir/*.log (the backends)
  admin token      $ADMIN_TOKEN
  configuration    scripts/demo.yaml, policies/, sale-mode state in $dir/state

Grafana: add a Prometheus data source with URL $pg and the custom HTTP header
X-Promguard-Grafana-Secret: $GRAFANA_SECRET (dashboards/provisioning/ does it, with
PROMGUARD_GRAFANA_SECRET=$GRAFANA_SECRET in Grafana's environment), and set
[dataproxy] send_user_header = true so that every person gets their own limits. The
curated dashboards are dashboards/*.json.

Paste any of these; they use the binary at $bin
(cargo install --path . puts promguard on your PATH).

Orders per minute by region, now: Prometheus answers. Run it twice quickly: the second
is a cache hit (x-cache: HIT), because a query without time= is evaluated at now
rounded down to 5 s (cache.instant_step), as every viewer's stat panel is.
    curl -siG $(q "$pg/api/v1/query") --data-urlencode 'query=sum by (region) (rate(shop_orders_total{status="created"}[5m])) * 60'

Orders per hour over the last 30 days: VictoriaMetrics answers what is older than
$recent, Prometheus the rest (x-promguard-backend: long_term, recent).
    curl -sG $month -D - -o /dev/null

An SRE switches sale mode on. The rules judge what would reach a backend: the month
above, in the cache now, is still answered without asking the long-term store; the
same panel for paid orders, which the cache does not hold, is refused with the rule
and the reason (HTTP 422, which Grafana shows on the panel), while the curated orders
dashboard, sent as the trusted Grafana sends it, is answered.
    $(q "$bin") sale-mode on $admin --for 1h --reason "demo: the sale started early" --by "\$(whoami)"
    curl -sG $month -o /dev/null -w 'HTTP %{http_code}\n'
    curl -sG $paid -w '\nHTTP %{http_code}\n'
    curl -sG $paid -H 'X-Promguard-Grafana-Secret: $GRAFANA_SECRET' -H 'X-Dashboard-Uid: orders' -H 'X-Grafana-User: alice' -o /dev/null -w 'HTTP %{http_code}\n'
    $(q "$bin") sale-mode status $admin
    $(q "$bin") sale-mode auto $admin --reason "demo: back to the plan" --by "\$(whoami)"

What the policies would do with a personal 7-day panel during Black Friday 2026:
    $(q "$bin") policy explain --policies $(q "$REPO/policies") --at 2026-11-28T12:00:00+03:00 --query 'sum by (region) (rate(shop_orders_total[5m]))' --start 2026-11-21T12:00:00+03:00 --end 2026-11-28T12:00:00+03:00 --step 600

promguard's counters every 10 s:
EOF

last=''
while kill -0 "$promguard_pid" 2>/dev/null; do
  line=$(summary 2>/dev/null || true)
  if [[ -n $line && $line != "$last" ]]; then
    printf '  %s  %s\n' "$(date +%T)" "$line"
    last=$line
  fi
  # In the background, so that Ctrl-C is handled at once.
  sleep 10 &
  wait $! || true
done
die "promguard exited; see $dir/promguard.log:
$(tail -n 5 "$dir/promguard.log")"
