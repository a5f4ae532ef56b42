#!/usr/bin/env bash
# The promguard demo in one command: a real Prometheus (the last 2 days at 30 s) and a
# real VictoriaMetrics (3 years: 1 h samples, the last 2 days at 30 s) loaded with a
# synthetic shop's metrics, both scraping it live, and promguard in front of them on
# http://127.0.0.1:9091.
#
#   scripts/demo.sh
#
# Run it as root or with sudo on a fresh Debian/Ubuntu machine: it installs prometheus
# and victoria-metrics with apt-get if they are missing and builds with cargo. It stays
# in the foreground until Ctrl-C, then stops everything it started. Data, logs and pids
# go to $PROMGUARD_DEMO_DIR (default /tmp/promguard-demo).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
readonly DIR=${PROMGUARD_DEMO_DIR:-/tmp/promguard-demo}
readonly PORT=9091

log() { printf 'demo.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
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
  # The packages start system services on 9090 and 8428, the ports this demo needs.
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
  scripts/backends.sh stop --dir "$DIR"
  exit "$status"
}

# The last Black Friday (last Friday of November) before today, as YYYY-MM-DD.
last_black_friday() {
  local year friday
  year=$(date -u +%Y)
  for year in "$year" $((year - 1)); do
    # %u: Monday is 1, Friday 5.
    friday=$(date -u -d "$year-11-30 -$((($(date -u -d "$year-11-30" +%u) + 2) % 7)) days" +%F)
    if [[ $friday < $(date -u +%F) ]]; then
      echo "$friday"
      return
    fi
  done
}

install_backends
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain first"
log "building (cargo build --release)"
cargo build --release

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

urls=$(scripts/backends.sh start --dir "$DIR")
url() { sed -n "s/^$1=//p" <<<"$urls"; }
PROMETHEUS_URL=$(url PROMETHEUS_URL)
VM_URL=$(url VM_URL)
EXPORTER_URL=$(url EXPORTER_URL)

target/release/promguard serve --listen "127.0.0.1:$PORT" --recent-url "$PROMETHEUS_URL" \
  --recent-window 2d --long-term-url "$VM_URL" &
promguard_pid=$!
deadline=$((SECONDS + 30))
until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
  kill -0 "$promguard_pid" 2>/dev/null || die "promguard exited before listening on 127.0.0.1:$PORT"
  ((SECONDS < deadline)) || die "promguard is not listening on 127.0.0.1:$PORT after 30 s"
  sleep 0.2
done

# demo-data runs on Moscow time (UTC+3): yesterday's demo SLA backend incident is at
# 14:00-14:20 there, and Black Friday's sale opens at midnight there (21:00 UTC).
now=$(date +%s)
incident=$(date -u -d "$(date -u -d "@$((now + 3 * 3600 - 86400))" +%F) 11:00" +%s)
friday=$(last_black_friday)
opening=$(($(date -u -d "$friday" +%s) - 3 * 3600))
pg=http://127.0.0.1:$PORT
# The promguard dashboard shows promguard's own metrics: list it for Prometheus to scrape.
printf '[{"targets": ["127.0.0.1:%s"], "labels": {"job": "promguard"}}]\n' "$PORT" \
  >"$(url PROMGUARD_TARGETS_DIR)/demo.json"
cat <<EOF

promguard demo is running; Ctrl-C stops everything.
  promguard        $pg   (point Grafana's Prometheus data source here)
  Prometheus       $PROMETHEUS_URL   (the last 2 days, 30 s samples)
  VictoriaMetrics  $VM_URL   (3 years: 1 h samples, the last 2 days at 30 s, plus live ones)
  demo-data        $EXPORTER_URL/metrics
  logs             $DIR/*.log

Curated dashboards (orders, sla, promguard): dashboards/*.json, with Grafana provisioning
in dashboards/provisioning/ (set the data source URL there to $pg).

Orders per minute by region, now (recent, so Prometheus answers):
  curl -sG $pg/api/v1/query --data-urlencode 'query=sum by (region) (rate(shop_orders_total{status="created"}[5m])) * 60'

The SLA backend incident yesterday, 5xx per second (also Prometheus):
  curl -sG $pg/api/v1/query_range --data-urlencode 'query=sum(rate(http_requests_total{service="sla-backend",code=~"5.."}[5m]))' -d start=$((incident - 1800)) -d end=$((incident + 3600)) -d step=60

Orders per minute around the opening of Black Friday $friday (long-term, so VictoriaMetrics):
  curl -sG $pg/api/v1/query_range --data-urlencode 'query=sum(increase(shop_orders_total{status="created"}[1h])) / 60' -d start=$((opening - 6 * 3600)) -d end=$((opening + 24 * 3600)) -d step=3600

EOF
wait "$promguard_pid"
