#!/usr/bin/env bash
# Start or stop a real Prometheus and VictoriaMetrics on loopback, loaded with demo-data:
# the recent range at a fine step in Prometheus (promtool backfill); everything in
# VictoriaMetrics, as a downsampled long-term store holds it (the long-term range at a
# coarse step, the recent range at the fine step); both scraping a live demo-data
# exporter so the data keeps growing. Prometheus also evaluates the curated dashboards'
# recording rules (dashboards/rules/*.yml, backfilled over the recent range) and scrapes
# the promguard processes listed in JSON files (file_sd format) in PROMGUARD_TARGETS_DIR.
#
#   scripts/backends.sh start --dir DIR [--prom-port 9090] [--vm-port 8428]
#       [--exporter-port 9200] [--instances 8] [--recent 2d] [--recent-step 30s]
#       [--long-term 3y] [--long-term-step 1h] [--bin-dir target/release]
#   scripts/backends.sh stop --dir DIR
#
# Durations are one number and a unit: s, m, h, d, w or y (365 days). `start` builds
# nothing: demo-data must already be in --bin-dir. Once both backends answer queries it
# prints PROMETHEUS_URL=, VM_URL=, EXPORTER_URL= and PROMGUARD_TARGETS_DIR= lines on
# stdout; progress goes to stderr, logs and pid files to DIR. If `start` fails it stops
# whatever it started.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
# Daemons in the order `stop` ends them: the scrapers before what they scrape.
readonly DAEMONS=(prometheus victoria-metrics exporter)

log() { printf 'backends.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
usage() {
  sed -n '7,10s/^#   //p' "$0" >&2
  exit 2
}

# Seconds in a duration such as 30s, 2d or 3y.
seconds() {
  local number=${1%[smhdwy]} unit=${1##*[0-9]}
  [[ $number =~ ^[0-9]+$ && $unit =~ ^[smhdwy]$ && $number -gt 0 ]] ||
    die "bad duration '$1': use a positive number and a unit s, m, h, d, w or y"
  case $unit in
    s) echo "$number" ;;
    m) echo $((number * 60)) ;;
    h) echo $((number * 3600)) ;;
    d) echo $((number * 86400)) ;;
    w) echo $((number * 604800)) ;;
    y) echo $((number * 31536000)) ;;
  esac
}

# The program each daemon runs, to tell our process from an unrelated one that was
# given the same pid after ours died.
program() {
  case $1 in
    exporter) echo demo-data ;;
    *) echo "$1" ;;
  esac
}

# The pid of daemon $1 if it is running, else nothing.
running_pid() {
  local file=$dir/$1.pid pid
  [[ -f $file ]] || return 0
  pid=$(<"$file")
  # /proc rather than ps: minimal Debian images lack procps.
  if [[ $pid =~ ^[0-9]+$ ]] && [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"$(program "$1")"* ]]; then
    echo "$pid"
  fi
}

# Runs a daemon in its own session (so a Ctrl-C meant for the caller does not reach it),
# with its pid in $dir and its log appended to $dir/NAME.log (a restart keeps the log).
launch() {
  local name=$1
  shift
  setsid "$@" >>"$dir/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/$name.pid"
}

# Stops daemon $1, if it runs, and waits until it is gone.
stop_daemon() {
  local pid
  pid=$(running_pid "$1")
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
}

# A progress line: phase $1 has done $2 of $3 since $SECONDS was $4.
progress() {
  local phase=$1 done=$2 total=$3 elapsed=$((SECONDS - $4))
  if ((done >= total)); then
    log "$phase: done in $elapsed s"
  elif ((done > 0)); then
    log "$phase: $((100 * done / total))% after $elapsed s, about $((elapsed * (total - done) / done)) s left"
  else
    log "$phase: started"
  fi
}

# Runs `$2... FILE` for each FILE in the array named $1, saying how far phase $PHASE
# got (in bytes of the files done) at most every 3 s, and when it is done.
each_part() {
  local -n files=$1
  shift
  local began=$SECONDS said=$SECONDS done=0 total=0 file
  for file in "${files[@]}"; do
    total=$((total + $(stat -c %s "$file")))
  done
  progress "$PHASE" 0 "$total" "$began"
  for file in "${files[@]}"; do
    "$@" "$file" || return 1
    done=$((done + $(stat -c %s "$file")))
    if ((done >= total || SECONDS - said >= 3)); then
      progress "$PHASE" "$done" "$total" "$began"
      said=$SECONDS
    fi
  done
}

# Polls URL $2 until it answers 2xx, failing early if daemon $1 has exited.
wait_http() {
  local name=$1 url=$2 deadline=$((SECONDS + $3)) pid
  pid=$(<"$dir/$name.pid")
  until curl -fsS -o /dev/null --max-time 5 "$url" 2>/dev/null; do
    # Whether the process still exists, not what it runs: right after launch it
    # may not have exec'd its program yet, and on a loaded machine that takes a
    # while.
    kill -0 "$pid" 2>/dev/null || die "$name exited; see $dir/$name.log:
$(tail -n 5 "$dir/$name.log")"
    ((SECONDS < deadline)) || die "$name did not answer $url within $3 s; see $dir/$name.log"
    sleep 0.5
  done
}

# Polls until instant query $3 against backend $1 (base URL $2) returns data, at UNIX
# time $4 if given, else now.
wait_data() {
  local name=$1 url=$2 query=$3 time=${4:-} deadline=$((SECONDS + 120))
  until curl -fsS --max-time 30 -G "$url/api/v1/query" --data-urlencode "query=$query" \
    ${time:+--data-urlencode "time=$time"} 2>/dev/null | grep -q '"result":\[{'; do
    ((SECONDS < deadline)) || die "$name has no data for $query${time:+ at $time}; see $dir/$name.log"
    sleep 1
  done
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

stop() {
  local name pid pids=() deadline
  for name in "${DAEMONS[@]}"; do
    pid=$(running_pid "$name")
    if [[ -n $pid ]]; then
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  # The daemons are not our children, so poll instead of `wait`. Both backends flush to
  # disk on SIGTERM; give them time before killing.
  deadline=$((SECONDS + 60))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ignored SIGTERM for 60 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for name in "${DAEMONS[@]}"; do
    rm -f "$dir/$name.pid"
  done
}

# On any failure of `start`: end our background jobs and daemons, so that nothing is
# left holding the ports.
abort_start() {
  local status=$?
  trap - EXIT
  if ((status != 0)); then
    log "start failed; stopping what was started"
    jobs -p | xargs -r kill 2>/dev/null || true
    stop
  fi
  exit "$status"
}

start() {
  local name port tool
  for name in "${DAEMONS[@]}"; do
    [[ -z $(running_pid "$name") ]] || die "$name from an earlier start still runs; run: $0 stop --dir $dir"
  done
  local -A port_option=([$prom_port]=--prom-port [$vm_port]=--vm-port [$exporter_port]=--exporter-port)
  for port in "$prom_port" "$vm_port" "$exporter_port"; do
    port_free "$port" || die "port $port on 127.0.0.1 is in use: choose another with ${port_option[$port]}"
  done
  local demo=$bin_dir/demo-data
  [[ -x $demo ]] || die "$demo not found: build it first (cargo build --release), or give --bin-dir"
  for tool in promtool prometheus victoria-metrics curl setsid; do
    command -v "$tool" >/dev/null || die "$tool is not installed (see scripts/demo.sh)"
  done
  ((long_term >= recent)) || die "--long-term must cover --recent: the long-term store holds everything"

  trap abort_start EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local began=$SECONDS
  rm -rf "$dir/prometheus" "$dir/vm" "$dir/data" "$dir/blocks" "$dir/rule-blocks" \
    "$dir/promguard-targets" "$dir/prometheus-queries.log" "$dir/promtool.log"
  for name in "${DAEMONS[@]}"; do
    rm -f "$dir/$name.log"
  done
  mkdir -p "$dir/data" "$dir/promguard-targets"

  # demo-data's calendar is Moscow time (UTC+3). Its demo incident falls on the day
  # before the data ends; pin that day for the exporter too, so its counters continue the
  # generated ones even if Moscow midnight passes while the data loads.
  local incident_day
  incident_day=$(date -u -d "@$(($(date +%s) + 3 * 3600 - 86400))" +%F)
  local model=(--instances "$instances" --incident-day "$incident_day")

  # The live side first: the exporter, and both backends scraping it, so that the
  # generated history ends where the scraped samples begin, with no gap between them.
  launch exporter "$demo" serve --listen "127.0.0.1:$exporter_port" "${model[@]}"
  local exporter_url=http://127.0.0.1:$exporter_port
  wait_http exporter "$exporter_url/metrics" 30
  write_configs

  # Retention a month beyond the range: VictoriaMetrics refuses samples older than it.
  # Its lookback must span the long-term step: with the default, VictoriaMetrics 1.79
  # answers an instant query more than a few minutes after an hourly sample with nothing.
  launch victoria-metrics victoria-metrics -httpListenAddr="127.0.0.1:$vm_port" \
    -storageDataPath="$dir/vm" -retentionPeriod="$((long_term / 86400 + 31))d" \
    -promscrape.config="$dir/scrape.yml" -search.latencyOffset=5s \
    -search.maxLookback="${long_step}s"
  local vm_url=http://127.0.0.1:$vm_port prom_url=http://127.0.0.1:$prom_port
  start_prometheus prometheus-loading.yml
  wait_http victoria-metrics "$vm_url/health" 60

  local end recent_start long_start
  end=$(date +%s)
  recent_start=$((end - recent))
  long_start=$((end - long_term))

  # Ten parts each, so that loading them can tell how far it got.
  log "generating ${recent_step}s samples for $((recent / 3600)) h and ${long_step}s samples for $((long_term / 86400)) d, up to the first live scrape"
  "$demo" openmetrics --out "$dir/data/recent.om" --parts 10 --start "$recent_start" \
    --end "$end" --step "${recent_step}s" "${model[@]}" &
  local recent_job=$!
  # The long-term store holds everything, like a downsampled LTS: the coarse step
  # before the recent range, and the recent range at scrape resolution, so that
  # selectors narrower than the coarse step behave there as they would in production.
  "$demo" vm-import --out "$dir/data/long-term.jsonl" --parts 10 --start "$long_start" \
    --end "$((recent_start - 1))" --step "${long_step}s" "${model[@]}" &
  local long_term_job=$!
  "$demo" vm-import --out "$dir/data/recent.jsonl" --parts 10 --start "$recent_start" \
    --end "$end" --step "${recent_step}s" "${model[@]}" &
  local recent_vm_job=$!
  wait "$recent_job" || die "generating the recent data failed"
  wait "$long_term_job" || die "generating the long-term data failed"
  wait "$recent_vm_job" || die "generating the recent data for VictoriaMetrics failed"

  local om_parts=("$dir"/data/recent.om.*)
  local jsonl_parts=("$dir"/data/long-term.jsonl.* "$dir"/data/recent.jsonl.*)
  PHASE="backfilling Prometheus" each_part om_parts backfill_part &
  local backfill_job=$!
  PHASE="importing into VictoriaMetrics" each_part jsonl_parts import_part "$vm_url" ||
    die "import into VictoriaMetrics failed; see $dir/victoria-metrics.log"
  curl -fsS "$vm_url/internal/force_flush" >/dev/null
  wait_data victoria-metrics "$vm_url" 'count(shop_orders_total)' "$((long_start + 86400))"
  # Queries made while importing may have cached partial answers.
  curl -fsS "$vm_url/internal/resetRollupResultCache" >/dev/null
  wait "$backfill_job" || die "promtool backfill failed; see $dir/promtool.log"
  # A running Prometheus loads new blocks only at its next minutely reload; a restart
  # loads them at once, for a few seconds of scrapes.
  mv "$dir/blocks"/* "$dir/prometheus/"
  stop_daemon prometheus
  start_prometheus prometheus-loading.yml
  wait_data prometheus "$prom_url" 'count(shop_orders_total)' "$((recent_start + 3600))"

  # The recording rules over the generated range, so the curated dashboards have history
  # from the start (from the first scrape on, Prometheus evaluates them itself). promtool
  # evaluates them through the live Prometheus, whose query log tells how far it got.
  backfill_rules "$prom_url" "$recent_start" "$end" &
  local rules_job=$!
  watch_rule_backfill "$rules_job" "$recent_start" "$end"
  wait "$rules_job" || die "promtool rule backfill failed; see $dir/promtool-rules.log"
  mv "$dir/rule-blocks"/* "$dir/prometheus/"
  stop_daemon prometheus
  start_prometheus prometheus.yml
  rm -f "$dir/prometheus-queries.log"
  wait_data prometheus "$prom_url" 'count(shop_orders_total)' "$((recent_start + 3600))"
  wait_data prometheus "$prom_url" 'count(region_channel_status:shop_orders:rate1m)' "$((recent_start + 3600))"
  # Ready means live too: both have scraped the exporter (series metadata, for one,
  # exists only after a scrape).
  wait_data prometheus "$prom_url" 'up{job="demo-data"} == 1'
  wait_data victoria-metrics "$vm_url" 'up{job="demo-data"} == 1'

  rm -rf "$dir/data" "$dir/blocks" "$dir/rule-blocks"
  trap - EXIT INT TERM
  log "ready in $((SECONDS - began)) s"
  printf 'PROMETHEUS_URL=%s\nVM_URL=%s\nEXPORTER_URL=%s\nPROMGUARD_TARGETS_DIR=%s\n' \
    "$prom_url" "$vm_url" "$exporter_url" "$dir/promguard-targets"
}

# The scrape configuration (both backends) and Prometheus' own (scrape, rules), in $dir.
write_configs() {
  # honor_labels keeps the exporter's own `instance` labels (per service instance); the
  # relabelling then drops the target labels the scraper adds (`job`, and `instance`
  # where the exporter set none), so scraped samples extend the generated series
  # instead of starting new ones.
  cat >"$dir/scrape.yml" <<EOF
global:
  scrape_interval: 15s
scrape_configs:
  - job_name: demo-data
    honor_labels: true
    static_configs:
      - targets: ["127.0.0.1:$exporter_port"]
    metric_relabel_configs:
      - action: labeldrop
        regex: job
      - source_labels: [instance]
        regex: 127\.0\.0\.1:$exporter_port
        target_label: instance
        replacement: ""
EOF
  # Prometheus scrapes the same exporter, plus the promguard processes that demo.sh and the
  # e2e tests list in the targets directory (watched, so a new file is picked up at once),
  # and evaluates the curated dashboards' recording rules. A file of its own, because
  # VictoriaMetrics refuses rule_files in a scrape config.
  cat "$dir/scrape.yml" - >"$dir/prometheus.yml" <<EOF
  - job_name: promguard
    scrape_interval: 5s
    file_sd_configs:
      - files: ["$dir/promguard-targets/*.json"]
rule_files:
  - $REPO/dashboards/rules/*.yml
EOF
  # While the data loads, Prometheus also logs its queries: that is how the rule
  # backfill's progress is told.
  sed "s|^global:\$|global:\n  query_log_file: $dir/prometheus-queries.log|" \
    "$dir/prometheus.yml" >"$dir/prometheus-loading.yml"
}

# Starts the live Prometheus with config file $1 (in $dir) and waits until it is ready.
# Retention beyond the range, so the backfill survives a demo left running.
start_prometheus() {
  launch prometheus prometheus --config.file="$dir/$1" --storage.tsdb.path="$dir/prometheus" \
    --storage.tsdb.retention.time="$((recent + 7 * 86400))s" --web.listen-address="127.0.0.1:$prom_port"
  wait_http prometheus "http://127.0.0.1:$prom_port/-/ready" 120
}

# promtool makes one pass over a file per block, so it is asked for blocks at least as
# long as the range: the smallest of its compatible sizes (2h * 3^n) that covers it.
backfill_part() {
  local block=7200
  while ((block < recent)); do block=$((block * 3)); done
  promtool tsdb create-blocks-from openmetrics --quiet --max-block-duration="${block}s" \
    "$1" "$dir/blocks" >>"$dir/promtool.log" 2>&1
}

# -T streams the file; --data-binary @file would first read all of it into memory.
import_part() {
  curl -sS --fail-with-body -X POST -T "$2" "$1/api/v1/import" >&2
}

backfill_rules() {
  promtool tsdb create-blocks-from rules --start="$2" --end="$3" --url="$1" \
    --output-dir="$dir/rule-blocks" "$REPO"/dashboards/rules/*.yml >"$dir/promtool-rules.log" 2>&1
}

# Says every few seconds how far the rule backfill (job $1, over $2 to $3) got. promtool
# runs one range query per rule and two-hour block, each a line in the query log.
watch_rule_backfill() {
  local job=$1 began=$SECONDS rules total done
  rules=$(cat "$REPO"/dashboards/rules/*.yml | grep -c '^ *- record:')
  total=$((rules * ($3 / 7200 - $2 / 7200 + 1)))
  local phase="backfilling $rules recording rules"
  progress "$phase" 0 "$total" "$began"
  while kill -0 "$job" 2>/dev/null; do
    sleep 3
    kill -0 "$job" 2>/dev/null || break
    done=$(grep -c '"path":"/api/v1/query_range"' "$dir/prometheus-queries.log" 2>/dev/null || true)
    done=${done:-0}
    ((done < total)) || done=$((total - 1))
    progress "$phase" "$done" "$total" "$began"
  done
  progress "$phase" "$total" "$total" "$began"
}

(($# > 0)) || usage
command=$1
shift
dir='' prom_port=9090 vm_port=8428 exporter_port=9200 instances=8
recent=2d recent_step=30s long_term=3y long_step=1h bin_dir=$REPO/target/release
while (($# > 0)); do
  (($# >= 2)) || die "$1 needs a value"
  case $1 in
    --dir) dir=$2 ;;
    --prom-port) prom_port=$2 ;;
    --vm-port) vm_port=$2 ;;
    --exporter-port) exporter_port=$2 ;;
    --instances) instances=$2 ;;
    --recent) recent=$2 ;;
    --recent-step) recent_step=$2 ;;
    --long-term) long_term=$2 ;;
    --long-term-step) long_step=$2 ;;
    --bin-dir) bin_dir=$2 ;;
    *) die "unknown option $1" ;;
  esac
  shift 2
done
[[ -n $dir ]] || die "--dir is required"

case $command in
  start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    for number in "$prom_port" "$vm_port" "$exporter_port" "$instances"; do
      [[ $number =~ ^[0-9]+$ ]] || die "expected a number, got '$number'"
    done
    recent=$(seconds "$recent")
    recent_step=$(seconds "$recent_step")
    long_term=$(seconds "$long_term")
    long_step=$(seconds "$long_step")
    start
    ;;
  stop)
    # Nothing was started in a directory that does not exist.
    [[ ! -d $dir ]] || stop
    ;;
  *) usage ;;
esac
