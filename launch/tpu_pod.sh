#!/usr/bin/env bash
# Run one command on every worker (host) of a Cloud TPU VM slice: create or reuse the slice, copy the code to all
# workers, install it, run the command everywhere, keep per-worker logs. `--help` for the options; launch/README.md
# for the whole story (which mesh, where checkpoints go, resuming after preemption).
# shellcheck disable=SC2088  # a literal "~/" in a path is on purpose: the workers' shell or expand_home expands it
set -euo pipefail

PROG=tpu_pod.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE [options] -- COMMAND [ARG...]
       launch/tpu_pod.sh --tpu=NAME --zone=ZONE --run-name=RUN (--attach | --stop)

Creates the TPU VM slice NAME if it does not exist (a READY one is reused, a STOPPED one started, a PREEMPTED or
TERMINATED one deleted and re-created), copies this checkout to every worker, installs it in a virtualenv there
(uv, Python 3.11, `pip install -c constraints.txt -e . jax[tpu]`), then runs COMMAND on all workers at once with
`gcloud compute tpus tpu-vm ssh --worker=all`. COMMAND runs in the repository directory with the virtualenv first
on PATH, exactly as given (each argument is quoted for the remote shell; no second round of shell parsing).

Example:
  launch/tpu_pod.sh --tpu=opd-v5p-64 --zone=us-east5-a --spot -- \
    python -m jopd.train --config=configs/deepmath.py --config.log_path=gs://BUCKET/runs/deepmath-opd

Options:
  --tpu=NAME               TPU VM name (required)
  --zone=ZONE              zone (required)
  --project=PROJECT        GCP project (default: gcloud's core/project)
  --accelerator-type=TYPE  slice type when creating it (default: v5p-64)
  --version=RUNTIME        TPU VM runtime version when creating it (default: from the type: v4 -> tpu-ubuntu2204-base,
                           v5p -> v2-alpha-tpuv5, v5litepod -> v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e)
  --queued                 create through a queued resource (named like the TPU) and wait until it is ACTIVE
  --spot                   spot capacity (preemptible; rerun the same command to resume, see launch/README.md)
  --create-flag=FLAG       extra flag for the create command, e.g. --create-flag=--reserved (repeatable)
  --repo-dir=DIR           where the code lives on the workers (default: ~/jopd)
  --run-name=RUN           name of this run's log directory (default: UTC time, e.g. 20250101-120000)
  --log-dir=DIR            local log directory (default: logs); logs go to DIR/NAME/RUN/worker-N.log
  --python=VERSION         Python version of the workers' virtualenv (default: 3.11)
  --extras=LIST            pip extras of jopd to install, e.g. --extras=wandb
  --skip-setup             do not copy or install the code (reuse what the workers have)
  --internal-ip            connect to the workers by internal IP (from a VM in the same VPC)
  --max-restarts=N         when the run ends with status 42 (jopd.train got SIGTERM and saved a checkpoint) or 255
                           (ssh lost the workers, e.g. a preempted spot slice), start over: re-create the slice
                           if needed, sync, run the same command, which resumes from log_path (default: 0)
  --detach                 start the command and return; follow it later with --attach
  --attach                 follow the live run RUN (its output from the last 20 lines on)
  --stop                   send SIGTERM to run RUN on all workers (jopd.train saves a checkpoint, then exits)
  --dry-run                print every command (gcloud, tar) as "+ ..." instead of running it; needs no gcloud
  -h, --help               this help

Logs: every worker runs COMMAND detached from the ssh session (setsid) and appends its output to
<repo-dir>/logs/RUN/worker-N.log on its own disk, so a dropped connection or Ctrl-C does not stop the run
(use --stop). The output streams back with a "[worker N] " prefix and is split locally into
<log-dir>/NAME/RUN/worker-N.log. Exit status: non-zero if COMMAND failed on any worker.
Before `--worker=all` works without a passphrase prompt per worker: ssh-add ~/.ssh/google_compute_engine
EOF
}

# =====================================================================================================
# Worker side: the modes below run on the TPU VM workers, invoked by the ssh commands of the local side.
# =====================================================================================================

# This worker's index in the slice: TPU_WORKER_ID when set (GKE, tests), else the metadata server, else the host.
worker_id() {
  local id
  if [ -n "${TPU_WORKER_ID:-}" ]; then
    printf '%s' "$TPU_WORKER_ID"
  elif id=$(curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) &&
    [[ $id =~ ^[0-9]+$ ]]; then
    printf '%s' "$id"
  else
    hostname
  fi
}

# Print the pid recorded in $1 if that process is alive and is one of our --worker-exec wrappers.
live_pid() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- '--worker-exec'; then
    return 1 # a stale pid file whose pid was reused
  fi
  printf '%s' "$pid"
}

# Parse "--key=value" flags of the worker modes into variables named by the caller (w_<key>).
parse_worker_flags() {
  w_args=()
  while [ $# -gt 0 ]; do
    case $1 in
      --repo-dir=*) w_repo_dir=${1#*=} ;;
      --run-name=*) w_run_name=${1#*=} ;;
      --src=*) w_src=${1#*=} ;;
      --python=*) w_python=${1#*=} ;;
      --extras=*) w_extras=${1#*=} ;;
      --detach) w_detach=1 ;;
      --attach) w_attach=1 ;;
      --) shift; w_args=("$@"); return 0 ;;
      *) die "worker mode: unexpected argument: $1" ;;
    esac
    shift
  done
}

# --worker-setup: move the unpacked code from --src into --repo-dir, then install it into <repo-dir>/.venv.
worker_setup() {
  w_repo_dir='~/jopd' w_src='' w_python=3.11 w_extras=''
  parse_worker_flags "$@"
  local repo src manifest files
  repo=$(expand_home "$w_repo_dir")
  src=$(expand_home "$w_src")
  [ -d "$src" ] || die "worker setup: no unpacked code at $src"
  mkdir -p "$repo"
  manifest="$repo/.jopd-launch-files"
  files=$(cd "$src" && find . \( -type f -o -type l \) -print | LC_ALL=C sort)
  if [ -f "$manifest" ]; then
    # Delete the files an earlier sync brought that are gone now (a removed module must not stay importable).
    # Only files listed in the manifest are ever deleted: .venv, logs and runs/ stay.
    LC_ALL=C comm -23 "$manifest" <(printf '%s\n' "$files") | while IFS= read -r f; do
      rm -f "$repo/$f"
    done
  fi
  cp -a "$src"/. "$repo"/
  printf '%s\n' "$files" >"$manifest"
  rm -rf "$src"

  cd "$repo"
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v uv >/dev/null 2>&1; then
    info "installing uv"
    python3 -m pip install --user --quiet uv 2>/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
    command -v uv >/dev/null 2>&1 || die "could not install uv"
  fi
  if ! .venv/bin/python -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$w_python')" 2>/dev/null; then
    rm -rf .venv
    uv venv --python "$w_python" .venv
  fi
  local pkg=.
  if [ -n "$w_extras" ]; then pkg=".[$w_extras]"; fi
  uv pip install --python .venv/bin/python -c constraints.txt -e "$pkg" 'jax[tpu]'
  .venv/bin/python -c 'import jax, jopd; print("installed jax", jax.__version__)'
}

# --worker-exec PIDFILE STATUSFILE LOG -- COMMAND...: runs under setsid (its own session and process group), so
# the ssh session ending does not signal it. Records its pid (= the process group id, for --stop) and, after
# COMMAND ends, COMMAND's exit status.
worker_exec() {
  local pidf=$1 statf=$2 log=$3 rc=0
  shift 3
  if [ "${1:-}" = -- ]; then shift; fi
  # A signal sent to the group (--stop, preemption) is for COMMAND to handle; this shell waits for it and records
  # its status. (A trap, unlike ignoring the signal, is reset to the default in COMMAND.)
  trap ':' TERM INT HUP
  echo "$$" >"$pidf.tmp" && mv "$pidf.tmp" "$pidf"
  "$@" >>"$log" 2>&1 </dev/null || rc=$?
  printf '[tpu_pod] %s exit status %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$rc" >>"$log"
  echo "$rc" >"$statf.tmp" && mv "$statf.tmp" "$statf"
  exit "$rc"
}

# Stream the log of a live run, each line prefixed "[worker N] ", until the run ends; then exit with its status.
follow_run() {
  local pid=$1 id=$2 log=$3 statf=$4 i rc
  shift 4
  tail "$@" -F -s 0.2 --pid="$pid" "$log" 2>/dev/null | awk -v p="[worker $id] " '{ print p $0; fflush() }'
  for i in $(seq 50); do
    if [ -f "$statf" ]; then break; fi
    sleep 0.1
  done
  if ! rc=$(cat "$statf" 2>/dev/null) || ! [[ $rc =~ ^[0-9]+$ ]]; then
    printf '[worker %s] [tpu_pod] the run ended without recording an exit status (killed?)\n' "$id"
    exit 1
  fi
  exit "$rc"
}

# --worker-run: start COMMAND in the background (or re-attach to the run of the same name), stream its output.
worker_run() {
  w_repo_dir='~/jopd' w_run_name='' w_detach=0 w_attach=0
  parse_worker_flags "$@"
  [[ $w_run_name =~ ^[A-Za-z0-9._-]+$ ]] || die "worker run: bad --run-name '$w_run_name'"
  local repo id base log pidf statf pid f offset i
  repo=$(expand_home "$w_repo_dir")
  id=$(worker_id)
  mkdir -p "$repo/logs/$w_run_name"
  base="$repo/logs/$w_run_name/worker-$id"
  log="$base.log" pidf="$base.pid" statf="$base.status"

  if pid=$(live_pid "$pidf"); then
    printf '[worker %s] [tpu_pod] run %s is running (pid %s); following %s\n' "$id" "$w_run_name" "$pid" "$log"
    follow_run "$pid" "$id" "$log" "$statf" -n 20
  fi
  if [ "$w_attach" = 1 ]; then
    die "worker $id: run $w_run_name is not running (its log: $log)"
  fi
  [ "${#w_args[@]}" -gt 0 ] || die "worker run: no command"
  # One run at a time holds the TPU: refuse to start a second one instead of failing deep inside libtpu.
  for f in "$repo"/logs/*/"worker-$id.pid"; do
    if [ "$f" != "$pidf" ] && pid=$(live_pid "$f"); then
      die "worker $id: run $(basename "$(dirname "$f")") (pid $pid) is still running; stop it with --stop --run-name=$(basename "$(dirname "$f")")"
    fi
  done

  rm -f "$pidf" "$statf"
  offset=$(($( (wc -c <"$log") 2>/dev/null || echo 0) + 1))
  printf '[tpu_pod] %s worker %s run %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$id" "$w_run_name" \
    "$(quote_argv "${w_args[@]}")" >>"$log"
  cd "$repo"
  export PATH="$repo/.venv/bin:$PATH" PYTHONUNBUFFERED=1
  setsid bash "$SELF" --worker-exec "$pidf" "$statf" "$log" -- "${w_args[@]}" </dev/null >/dev/null 2>&1 &
  for i in $(seq 100); do
    if [ -s "$pidf" ]; then break; fi
    sleep 0.1
  done
  [ -s "$pidf" ] || die "worker $id: the run did not start (see $log)"
  pid=$(cat "$pidf")
  if [ "$w_detach" = 1 ]; then
    printf '[worker %s] [tpu_pod] started run %s (pid %s), log %s\n' "$id" "$w_run_name" "$pid" "$log"
    exit 0
  fi
  follow_run "$pid" "$id" "$log" "$statf" -c "+$offset"
}

# --worker-stop: SIGTERM to the run's process group; wait up to 10 minutes for it to save and exit.
worker_stop() {
  w_repo_dir='~/jopd' w_run_name=''
  parse_worker_flags "$@"
  local repo id pidf pid i
  repo=$(expand_home "$w_repo_dir")
  id=$(worker_id)
  pidf="$repo/logs/$w_run_name/worker-$id.pid"
  if ! pid=$(live_pid "$pidf"); then
    printf '[worker %s] [tpu_pod] run %s is not running\n' "$id" "$w_run_name"
    return 0
  fi
  kill -TERM -- "-$pid"
  printf '[worker %s] [tpu_pod] sent SIGTERM to run %s (process group %s)\n' "$id" "$w_run_name" "$pid"
  for i in $(seq 600); do
    live_pid "$pidf" >/dev/null || break
    sleep 1
  done
  if live_pid "$pidf" >/dev/null; then
    printf '[worker %s] [tpu_pod] still running after %ss\n' "$id" "$i"
    return 1
  fi
  printf '[worker %s] [tpu_pod] run %s exited with status %s\n' "$id" "$w_run_name" \
    "$(cat "${pidf%.pid}.status" 2>/dev/null || echo '?')"
}

# =====================================================================================================
# Local side.
# =====================================================================================================

parse_args() {
  tpu='' zone='' project='' accelerator_type='' version='' queued=0 spot=0 repo_dir='~/jopd' run_name=''
  log_dir=logs python=3.11 extras='' skip_setup=0 internal_ip=0 detach=0 attach=0 stop=0 max_restarts=0
  create_flags=()
  user_cmd=()
  while [ $# -gt 0 ]; do
    arg=$1
    shift
    case $arg in
      --) user_cmd=("$@"); break ;;
      -h | --help) usage; exit 0 ;;
      --queued | --spot | --skip-setup | --internal-ip | --detach | --attach | --stop | --dry-run)
        case $arg in
          --queued) queued=1 ;; --spot) spot=1 ;; --skip-setup) skip_setup=1 ;; --internal-ip) internal_ip=1 ;;
          --detach) detach=1 ;; --attach) attach=1 ;; --stop) stop=1 ;; --dry-run) DRY_RUN=1 ;;
        esac
        ;;
      --tpu | --zone | --project | --accelerator-type | --version | --repo-dir | --run-name | --log-dir | --python | \
        --extras | --create-flag | --max-restarts | --tpu=* | --zone=* | --project=* | --accelerator-type=* | \
        --version=* | --repo-dir=* | --run-name=* | --log-dir=* | --python=* | --extras=* | --create-flag=* | \
        --max-restarts=*)
        case $arg in
          *=*) key=${arg%%=*} val=${arg#*=} ;;
          *)
            [ $# -gt 0 ] || usage_error "$arg needs a value"
            key=$arg val=$1
            shift
            ;;
        esac
        case $key in
          --tpu) tpu=$val ;; --zone) zone=$val ;; --project) project=$val ;;
          --accelerator-type) accelerator_type=$val ;; --version) version=$val ;; --repo-dir) repo_dir=$val ;;
          --run-name) run_name=$val ;; --log-dir) log_dir=$val ;; --python) python=$val ;; --extras) extras=$val ;;
          --create-flag) create_flags+=("$val") ;; --max-restarts) max_restarts=$val ;;
        esac
        ;;
      *) usage_error "unknown argument '$arg' (the command to run goes after --)" ;;
    esac
  done

  [ -n "$tpu" ] || usage_error "--tpu is required"
  [ -n "$zone" ] || usage_error "--zone is required"
  [[ $tpu =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || usage_error "--tpu must be a TPU name (lowercase letters, digits, -)"
  if [ "$attach" = 1 ] || [ "$stop" = 1 ]; then
    [ "$((attach + stop + detach))" = 1 ] || usage_error "--attach, --stop and --detach exclude each other"
    [ -n "$run_name" ] || usage_error "--attach and --stop need --run-name"
    [ "${#user_cmd[@]}" = 0 ] || usage_error "--attach and --stop take no command"
  else
    [ "${#user_cmd[@]}" -gt 0 ] || usage_error "no command given: put it after --"
  fi
  if [ -z "$run_name" ]; then run_name=$(date -u +%Y%m%d-%H%M%S); fi
  [[ $run_name =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--run-name may hold only letters, digits, '.', '_' and '-'"
  [[ $python =~ ^3\.[0-9]+$ ]] || usage_error "--python must look like 3.11"
  [[ $max_restarts =~ ^[0-9]+$ ]] || usage_error "--max-restarts must be a non-negative integer"
  [[ $extras =~ ^[A-Za-z0-9_,-]*$ ]] || usage_error "--extras must be a comma-separated list of extras"
  if [ -z "$accelerator_type" ]; then
    accelerator_type=v5p-64 accelerator_explicit=0
  else
    accelerator_explicit=1
  fi
  if [ -z "$version" ]; then
    case $accelerator_type in
      v4-*) version='tpu-ubuntu2204-base' ;;
      v5p-*) version=v2-alpha-tpuv5 ;;
      v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      *) usage_error "no default runtime version for --accelerator-type=$accelerator_type: pass --version" ;;
    esac
  fi
}

# Prints "STATE<tab>TYPE" of the TPU, or nothing if it does not exist; dies on any other gcloud error.
tpu_state() {
  local err out
  err=$(mktemp)
  if out=$(gcloud compute tpus tpu-vm describe "$tpu" "${loc[@]}" --format='value(state,acceleratorType)' \
    2>"$err"); then
    rm -f "$err"
    printf '%s' "$out"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    rm -f "$err"
  else
    cat "$err" >&2
    rm -f "$err"
    die "could not describe TPU $tpu in $zone"
  fi
}

# Prints the state of the queued resource named like the TPU, or nothing if it does not exist.
queued_state() {
  local err out
  err=$(mktemp)
  if out=$(gcloud compute tpus queued-resources describe "$tpu" "${loc[@]}" --format='value(state.state)' \
    2>"$err"); then
    rm -f "$err"
    printf '%s' "$out"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    rm -f "$err"
  else
    cat "$err" >&2
    rm -f "$err"
    die "could not describe queued resource $tpu in $zone"
  fi
}

create_tpu_vm() {
  run gcloud compute tpus tpu-vm create "$tpu" "${loc[@]}" --accelerator-type="$accelerator_type" \
    --version="$version" ${spot_flag[@]+"${spot_flag[@]}"} ${create_flags[@]+"${create_flags[@]}"}
}

create_queued() {
  run gcloud compute tpus queued-resources create "$tpu" --node-id="$tpu" "${loc[@]}" \
    --accelerator-type="$accelerator_type" --runtime-version="$version" ${spot_flag[@]+"${spot_flag[@]}"} \
    ${create_flags[@]+"${create_flags[@]}"}
}

# Create the TPU through a queued resource (re-creating a SUSPENDED or FAILED one) and wait until it is ACTIVE.
ensure_queued_active() {
  local state
  while :; do
    state=$(queued_state)
    case $state in
      ACTIVE) return 0 ;;
      '') create_queued ;;
      SUSPENDED | FAILED)
        info "queued resource $tpu is $state: deleting and re-creating it"
        run gcloud compute tpus queued-resources delete "$tpu" "${loc[@]}" --force --quiet
        ;;
      *) info "queued resource $tpu is $state; checking again in 60 s" && sleep 60 ;;
    esac
  done
}

ensure_tpu() {
  if [ "$DRY_RUN" = 1 ]; then
    run gcloud compute tpus tpu-vm describe "$tpu" "${loc[@]}" --format='value(state,acceleratorType)'
    if [ "$queued" = 1 ]; then
      run gcloud compute tpus queued-resources describe "$tpu" "${loc[@]}" --format='value(state.state)'
      note "dry run: assuming neither exists (a READY TPU is reused, a SUSPENDED/FAILED queued resource re-created)"
      create_queued
      note "then polls the queued resource every 60 s until its state is ACTIVE"
    else
      note "dry run: assuming the TPU does not exist (a READY one is reused, a STOPPED one started," \
        "a PREEMPTED/TERMINATED one deleted and re-created)"
      create_tpu_vm
    fi
    return 0
  fi
  local desc state type
  while :; do
    desc=$(tpu_state)
    state=$(printf '%s' "$desc" | awk '{ print $1 }')
    type=$(printf '%s' "$desc" | awk '{ print $2 }')
    case $state in
      READY)
        if [ "$accelerator_explicit" = 1 ] && [ -n "$type" ] && [ "$type" != "$accelerator_type" ]; then
          die "TPU $tpu exists as $type, not $accelerator_type: delete it or pick another --tpu"
        fi
        info "using TPU $tpu ($type, READY)"
        return 0
        ;;
      '')
        if [ "$queued" = 1 ]; then ensure_queued_active; else create_tpu_vm; fi
        ;;
      PREEMPTED | TERMINATED)
        info "TPU $tpu is $state: deleting and re-creating it"
        if [ "$queued" = 1 ] && [ -n "$(queued_state)" ]; then
          run gcloud compute tpus queued-resources delete "$tpu" "${loc[@]}" --force --quiet
        else
          run gcloud compute tpus tpu-vm delete "$tpu" "${loc[@]}" --quiet
        fi
        ;;
      STOPPED) run gcloud compute tpus tpu-vm start "$tpu" "${loc[@]}" ;;
      *) info "TPU $tpu is $state; checking again in 30 s" && sleep 30 ;;
    esac
  done
}

ssh_all() { # ssh_all REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$tpu" "${loc[@]}" --worker=all ${conn[@]+"${conn[@]}"} --command="$1"
}

sync_code() {
  # Remote paths are relative to the worker's home directory (where scp puts a relative destination).
  local remote="jopd-$run_name.tar.gz" stage=".jopd-stage-$run_name" root setup
  TARBALL="${TMPDIR:-/tmp}/jopd-$tpu-$run_name.tar.gz"
  root=$(repo_root)
  if [ "$DRY_RUN" = 1 ]; then
    print_code_tarball "$root" "$TARBALL"
  else
    info "packing $root (tracked and untracked, not ignored files) into $TARBALL"
    trap 'rm -f "$TARBALL"' EXIT
    make_code_tarball "$root" "$TARBALL"
  fi
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$tpu:$remote" "${loc[@]}" --worker=all ${conn[@]+"${conn[@]}"}
  setup=(--worker-setup --src="~/$stage" --repo-dir="$repo_dir" --python="$python")
  if [ -n "$extras" ]; then setup+=(--extras="$extras"); fi
  ssh_all "cd && rm -rf $stage && mkdir -p $stage && tar -xzf $remote -C $stage && rm -f $remote &&\
 bash $stage/launch/tpu_pod.sh $(quote_argv "${setup[@]}")"
}

# stdin: the merged output of all workers, lines prefixed "[worker N] ". Echo it, and append each line (prefix
# removed) to DIR/worker-N.log.
split_worker_logs() {
  awk -v dir="$1" '
    { print; fflush() }
    match($0, /^\[worker [^]]+\] /) {
      f = dir "/worker-" substr($0, 9, RLENGTH - 10) ".log"
      print substr($0, RLENGTH + 1) >> f
      close(f)
    }'
}

main() {
  parse_args "$@"
  loc=(--zone="$zone")
  if [ -n "$project" ]; then loc+=(--project="$project"); fi
  conn=()
  if [ "$internal_ip" = 1 ]; then conn+=(--internal-ip); fi
  spot_flag=()
  if [ "$spot" = 1 ]; then spot_flag+=(--spot); fi

  remote_script=$(quote_remote_path "$repo_dir/launch/tpu_pod.sh")
  worker_flags=(--repo-dir="$repo_dir" --run-name="$run_name")
  if [ "$stop" = 1 ]; then
    ssh_all "bash $remote_script --worker-stop $(quote_argv "${worker_flags[@]}")"
    exit 0
  fi

  local_logs="$log_dir/$tpu/$run_name"
  if [ "$attach" = 1 ]; then
    remote_cmd="bash $remote_script --worker-run $(quote_argv "${worker_flags[@]}") --attach"
  else
    mode=()
    if [ "$detach" = 1 ]; then mode=(--detach); fi
    remote_cmd="bash $remote_script --worker-run $(quote_argv "${worker_flags[@]}" ${mode[@]+"${mode[@]}"})"
    remote_cmd="$remote_cmd -- $(quote_argv "${user_cmd[@]}")"
  fi

  if [ "$DRY_RUN" = 1 ]; then
    if [ "$attach" = 0 ]; then
      ensure_tpu
      if [ "$skip_setup" = 0 ]; then sync_code; fi
    fi
    run mkdir -p "$local_logs"
    ssh_all "$remote_cmd"
    note "its output (lines prefixed [worker N]) is split into $local_logs/worker-N.log;" \
      "on the workers: $repo_dir/logs/$run_name/worker-N.log"
    if [ "$max_restarts" -gt 0 ]; then
      note "on exit status 42 (preempted, checkpoint saved) or 255 (workers unreachable) it starts over from" \
        "describe, up to $max_restarts times"
    fi
    exit 0
  fi

  mkdir -p "$local_logs"
  if [ -z "${SSH_AUTH_SOCK:-}" ]; then
    info "hint: with no ssh-agent, ssh may ask for the key passphrase once per worker (ssh-add ~/.ssh/google_compute_engine)"
  fi
  local restarts=0
  while :; do
    if [ "$attach" = 0 ]; then
      ensure_tpu
      if [ "$skip_setup" = 0 ]; then sync_code; fi
    fi
    rc=0
    ssh_all "$remote_cmd" | split_worker_logs "$local_logs" || rc=$?
    info "logs: $local_logs/worker-N.log (on the workers: $repo_dir/logs/$run_name/); run name: $run_name"
    # 42: jopd.train was told to stop (SIGTERM: maintenance, preemption notice) and saved a checkpoint.
    # 255: ssh could not reach a worker (e.g. the spot slice was preempted). Both resume from log_path.
    if [ "$attach" = 0 ] && [ "$detach" = 0 ] && [ "$restarts" -lt "$max_restarts" ] &&
      { [ "$rc" = 42 ] || [ "$rc" = 255 ]; }; then
      restarts=$((restarts + 1))
      info "exit status $rc: restart $restarts of $max_restarts (the run resumes from its last checkpoint)"
      continue
    fi
    break
  done
  if [ "$rc" != 0 ]; then
    info "failed with status $rc on at least one worker; re-attach with --attach --run-name=$run_name if it is still running"
  fi
  exit "$rc"
}

case ${1:-} in
  --worker-setup) shift; worker_setup "$@" ;;
  --worker-run) shift; worker_run "$@" ;;
  --worker-exec) shift; worker_exec "$@" ;;
  --worker-stop) shift; worker_stop "$@" ;;
  *) main "$@" ;;
esac
