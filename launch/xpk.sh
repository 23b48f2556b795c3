#!/usr/bin/env bash
# Submit a command as a GKE TPU workload with xpk (`xpk workload create`): one container per TPU host, all running
# the same command. `--help` for the options; launch/README.md for meshes, checkpoints and restarts.
set -euo pipefail

PROG=xpk.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/xpk.sh --cluster=CLUSTER --workload=NAME --tpu-type=TYPE [options] -- COMMAND [ARG...]

Runs `xpk workload create` for COMMAND on every host of NUM_SLICES slices of TYPE. Two ways to ship the code:
  --docker-image=IMAGE   an image that already has jopd installed (e.g. gcr.io/PROJECT/jopd:TAG); COMMAND runs
                         in the image's working directory.
  (default)              xpk builds an image from --base-docker-image plus a copy of this checkout (the files git
                         tracks and untracked files that are not ignored: no .venv), and every container first runs
                         `pip install -c constraints.txt -e . jax[tpu]`.
COMMAND is passed through exactly: each argument is quoted for the container's shell, and the last step is an
`exec`, so the SIGTERM that GKE sends on preemption or deletion reaches the trainer (which saves a checkpoint).

Example:
  launch/xpk.sh --cluster=my-cluster --workload=opd-1 --tpu-type=v5p-64 --max-restarts=10 -- \
    python -m jopd.train --config=configs/deepmath.py --config.log_path=gs://BUCKET/runs/deepmath-opd

Options:
  --cluster=CLUSTER          GKE cluster made by `xpk cluster create` (required)
  --workload=NAME            workload name (required; lowercase letters, digits, -)
  --tpu-type=TYPE            e.g. v5p-64 (required)
  --num-slices=N             number of slices (default: 1); see launch/README.md: not supported by jopd/mesh.py yet
  --project=PROJECT          GCP project (default: gcloud's)
  --zone=ZONE                zone (default: gcloud's)
  --docker-image=IMAGE       run this image as is (see above)
  --base-docker-image=IMAGE  base for the image xpk builds (default: python:3.11)
  --extras=LIST              pip extras of jopd to install in the default mode, e.g. --extras=wandb
  --max-restarts=N           JobSet restarts after a failure or preemption (xpk's default: 0); each restart runs
                             COMMAND again, and jopd.train resumes from log_path. N > 0 also passes
                             --restart-on-user-code-failure, so jopd.train's exit 42 (SIGTERM, checkpoint saved) and
                             crashes count as failures that restart
  --grace-period=SECONDS     termination grace period, time to save a checkpoint on SIGTERM (xpk's default: 30)
  --priority=PRIORITY        very-low | low | medium | high | very-high
  --xpk-arg=ARG              extra argument for `xpk workload create`, e.g. --xpk-arg=--spot (repeatable)
  --dry-run                  print the commands as "+ ..." instead of running them; needs no xpk
  -h, --help                 this help
EOF
}

cluster='' workload='' tpu_type='' num_slices=1 project='' zone='' docker_image='' base_image=python:3.11 extras=''
max_restarts='' grace_period='' priority=''
xpk_args=()
user_cmd=()
while [ $# -gt 0 ]; do
  arg=$1
  shift
  case $arg in
    --) user_cmd=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --cluster | --workload | --tpu-type | --num-slices | --project | --zone | --docker-image | --base-docker-image | \
      --extras | --max-restarts | --grace-period | --priority | --xpk-arg | --cluster=* | --workload=* | \
      --tpu-type=* | --num-slices=* | --project=* | --zone=* | --docker-image=* | --base-docker-image=* | \
      --extras=* | --max-restarts=* | --grace-period=* | --priority=* | --xpk-arg=*)
      case $arg in
        *=*) key=${arg%%=*} val=${arg#*=} ;;
        *)
          [ $# -gt 0 ] || usage_error "$arg needs a value"
          key=$arg val=$1
          shift
          ;;
      esac
      case $key in
        --cluster) cluster=$val ;; --workload) workload=$val ;; --tpu-type) tpu_type=$val ;;
        --num-slices) num_slices=$val ;; --project) project=$val ;; --zone) zone=$val ;;
        --docker-image) docker_image=$val ;; --base-docker-image) base_image=$val ;; --extras) extras=$val ;;
        --max-restarts) max_restarts=$val ;; --grace-period) grace_period=$val ;; --priority) priority=$val ;;
        --xpk-arg) xpk_args+=("$val") ;;
      esac
      ;;
    *) usage_error "unknown argument '$arg' (the command to run goes after --)" ;;
  esac
done

[ -n "$cluster" ] || usage_error "--cluster is required"
[ -n "$workload" ] || usage_error "--workload is required"
[ -n "$tpu_type" ] || usage_error "--tpu-type is required"
[ "${#user_cmd[@]}" -gt 0 ] || usage_error "no command given: put it after --"
[[ $workload =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || usage_error "--workload must be lowercase letters, digits and -"
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || usage_error "--num-slices must be a positive integer"
[[ $max_restarts =~ ^[0-9]*$ ]] || usage_error "--max-restarts must be a non-negative integer"
[[ $grace_period =~ ^[0-9]*$ ]] || usage_error "--grace-period must be a number of seconds"
[[ $extras =~ ^[A-Za-z0-9_,-]*$ ]] || usage_error "--extras must be a comma-separated list of extras"
for word in "${user_cmd[@]}"; do
  case $word in
    *$'\n'*) usage_error "an argument of the command holds a newline; xpk needs a one-line command" ;;
  esac
done

if [ "$num_slices" -gt 1 ]; then
  info "warning: jopd.mesh.make_mesh uses jax.make_mesh, which refuses devices from several slices;" \
    "a --num-slices=$num_slices run fails there until jopd/mesh.py builds a hybrid (ICI x DCN) mesh"
fi

# The container's command: xpk runs it as `bash -c '... (COMMAND) & ...'` and forwards SIGTERM to that subshell,
# so the trainer must replace the subshell (exec) to receive it.
container_cmd="export PYTHONUNBUFFERED=1 && exec $(quote_argv "${user_cmd[@]}")"

cmd=(xpk workload create --cluster="$cluster" --workload="$workload" --tpu-type="$tpu_type"
  --num-slices="$num_slices")
if [ -n "$project" ]; then cmd+=(--project="$project"); fi
if [ -n "$zone" ]; then cmd+=(--zone="$zone"); fi
if [ -n "$docker_image" ]; then
  cmd+=(--docker-image="$docker_image")
else
  pkg=.
  if [ -n "$extras" ]; then pkg=".[$extras]"; fi
  install=(pip install --quiet --root-user-action=ignore -c constraints.txt -e "$pkg" 'jax[tpu]')
  container_cmd="$(quote_argv "${install[@]}") && $container_cmd"
  # A clean copy of the checkout for xpk to build into the image (xpk would otherwise copy .venv and runs/ too).
  script_dir="${TMPDIR:-/tmp}/jopd-xpk-$workload"
  root=$(repo_root)
  tarball="$script_dir.tar.gz"
  run rm -rf "$script_dir"
  run mkdir -p "$script_dir"
  if [ "$DRY_RUN" = 1 ]; then
    print_code_tarball "$root" "$tarball"
  else
    make_code_tarball "$root" "$tarball"
  fi
  run tar -xzf "$tarball" -C "$script_dir"
  run rm -f "$tarball"
  cmd+=(--base-docker-image="$base_image" --script-dir="$script_dir")
fi
if [ -n "$max_restarts" ]; then
  cmd+=(--max-restarts="$max_restarts")
  # jopd.train exits 42 after a SIGTERM answered with a checkpoint. Recent xpk report a command's non-zero status
  # (other than 143) as success unless told to hand it to JobSet, which then restarts the workload.
  if [ "$max_restarts" -gt 0 ]; then cmd+=(--restart-on-user-code-failure); fi
fi
if [ -n "$grace_period" ]; then cmd+=(--termination-grace-period-seconds="$grace_period"); fi
if [ -n "$priority" ]; then cmd+=(--priority="$priority"); fi
cmd+=(${xpk_args[@]+"${xpk_args[@]}"} --command="$container_cmd")
run "${cmd[@]}"
if [ "$DRY_RUN" = 0 ]; then
  info "submitted; follow it with: xpk workload list --cluster=$cluster --wait-for-job-completion=$workload"
fi
