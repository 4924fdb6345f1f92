#!/usr/bin/env bash
# Train on a Cloud TPU VM: create it (or a queued resource), ship this code, install, run the
# same `python -m jaxft.train` on every worker, stream the logs, optionally delete it.
#
#   ./launch_tpu.sh --name my-tpu --zone us-central2-b --accelerator v4-32 --spot -- \
#       --config=configs/common.py --config.data.train='gs://bucket/data/*.jsonl' \
#       --workdir=gs://bucket/runs/mine
#
# Rerunning the same command with --skip-create resumes the run from its workdir's checkpoint on
# a VM still up; a preempted (spot) VM cannot be restarted: delete it and rerun without
# --skip-create, with the workdir on gs:// (runs/ on the VM's disk goes with it). With --detach
# the training outlives this script and its ssh sessions (a dropped connection would end it).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch_tpu.sh --name NAME --zone ZONE [options] -- TRAIN_ARGS...

TRAIN_ARGS go to `python -m jaxft.train` on every worker (with --config.distributed.enabled=True, so
multi-host slices find each other through jax.distributed).

  --name NAME          TPU VM name (also the queued resource's name)              [required]
  --zone ZONE          e.g. us-central2-b                                          [required]
  --accelerator TYPE   accelerator type, e.g. v4-8 (one host), v4-32 (four hosts)  [v4-8]
  --version VERSION    TPU runtime version   [v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5,
                       v5e (v5litepod): v2-alpha-tpuv5-lite, v4 and older: tpu-ubuntu2204-base]
  --project PROJECT    gcloud project                                   [gcloud's default]
  --spot               use spot capacity (preemptible: the run saves on SIGTERM; a preempted
                       VM must be deleted and created again: keep --workdir on gs://)
  --queued             create through a queued resource and wait until it is ACTIVE
  --ship git|scp       git: clone --repo at --ref on every worker; scp: copy this checkout's
                       committed tree (git archive)                                [git]
  --repo URL           repository to clone                        [this checkout's origin]
  --ref REF            commit, branch or tag to check out             [this checkout's HEAD]
  --skip-create        use an existing TPU VM of that name
  --delete             delete the TPU VM (or queued resource) when the script ends, also on
                       a failed step or Ctrl-C after the create
  --detach             start the training in the background on every worker and return: it
                       logs to ~/jaxft-train.log there (appended on each launch) and a dropped
                       ssh connection does not end it (not with --delete). A launch onto a VM
                       whose detached training still runs is refused before anything changes.
  --dry-run            print every gcloud command instead of running it
  -h, --help           this help
EOF
}

name= zone= accelerator=v4-8 version= project= spot= queued= ship=git
repo= ref= skip_create= delete= detach= dry_run=
while [[ $# -gt 0 ]]; do
  case "$1" in --name|--zone|--accelerator|--version|--project|--ship|--repo|--ref)
    [[ $# -ge 2 && $2 != -* ]] || { echo "launch_tpu.sh: $1 needs a value (see --help)" >&2; exit 2; } ;;
  esac
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --accelerator) accelerator=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --ship) ship=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    --skip-create) skip_create=1; shift ;;
    --delete) delete=1; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch_tpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
train_args=("$@")
[[ -n $name && -n $zone ]] || { echo 'launch_tpu.sh: --name and --zone are required (see --help)' >&2; exit 2; }
[[ ${#train_args[@]} -gt 0 ]] || { echo 'launch_tpu.sh: give the train arguments after -- (see --help)' >&2; exit 2; }
[[ -z $delete || -z $detach ]] || { echo 'launch_tpu.sh: --delete would delete the VM under the --detach training' >&2; exit 2; }
[[ $ship == git || $ship == scp ]] || { echo "launch_tpu.sh: --ship must be git or scp, not $ship" >&2; exit 2; }
if [[ -z $version ]]; then  # Cloud TPU's runtime for JAX per TPU generation.
  case $accelerator in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi
here=$(cd "$(dirname "$0")" && pwd)
if [[ $ship == git && -z $repo ]]; then
  repo=$(git -C "$here" remote get-url origin 2>/dev/null) ||
    { echo 'launch_tpu.sh: --ship git needs --repo (this checkout has no origin remote)' >&2; exit 2; }
fi
if [[ -z $ref ]] && ! git -C "$here" diff --quiet HEAD 2>/dev/null; then  # (Both ships take commits.)
  echo "launch_tpu.sh: warning: this checkout has uncommitted changes; the workers get HEAD without them" >&2
fi
ref=${ref:-$(git -C "$here" rev-parse HEAD)}

common=(--zone="$zone")
[[ -n $project ]] && common+=(--project="$project")

gcloud_() {  # Run (or with --dry-run print) one gcloud command.
  if [[ -n $dry_run ]]; then
    printf 'gcloud'; printf ' %q' "$@"; printf '\n'
  else
    gcloud "$@"
  fi
}

on_workers() {  # A shell command on every worker of the TPU VM, output streamed here.
  gcloud_ compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$1"
}

if [[ -z $skip_create ]]; then
  if [[ -n $queued ]]; then
    gcloud_ compute tpus queued-resources create "$name" --node-id="$name" "${common[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$version" ${spot:+--spot}
  else
    gcloud_ compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$accelerator" \
      --version="$version" ${spot:+--spot}
  fi
fi

delete_vm() {
  if [[ -n $queued ]]; then
    gcloud_ compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    gcloud_ compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}
# --delete holds however the script ends from here on (a failed install, a wait that fails,
# Ctrl-C): a VM left up is billed. (Not before: a failed create may name someone else's VM.)
if [[ -n $delete ]]; then
  trap 'status=$?; delete_vm || { echo "launch_tpu.sh: could not delete $name" >&2;
    [[ $status -ne 0 ]] || status=1; }; exit $status' EXIT
fi

if [[ -z $skip_create && -n $queued ]]; then
  state() { gcloud_ compute tpus queued-resources describe "$name" "${common[@]}" \
    --format='value(state.state)'; }
  if [[ -n $dry_run ]]; then
    state; echo '# (repeated every 30 s until it prints ACTIVE)'
  else
    while now=$(state) && [[ $now != ACTIVE ]]; do
      case $now in FAILED|SUSPENDING|SUSPENDED|DELETING)  # It will not become ACTIVE.
        echo "launch_tpu.sh: queued resource $name is $now (gcloud compute tpus queued-resources" \
          "describe $name --zone=$zone says why)" >&2; exit 1 ;;
      esac
      echo "waiting for queued resource $name to become ACTIVE ($now) ..."; sleep 30
    done
    [[ $now == ACTIVE ]] || exit 1  # (describe failed: gcloud said why.)
  fi
fi

# The code is shipped afresh each time; runs/ (the default workdirs) lives beside it in ~/runs,
# so a rerun with --skip-create finds its checkpoints and resumes.
keep_runs='mkdir -p runs && ln -sfn ../runs jaxft/runs'
# Not over a detached training that still runs (its code and workdir would change under it).
running='[ -f jaxft-train.pid ] && grep -qs jaxft.train /proc/$(cat jaxft-train.pid)/cmdline'
idle="if $running; then echo \"\$(hostname): a detached jaxft.train (pid \$(cat jaxft-train.pid))"
idle+=' is still running: wait for it to end, or stop it on every worker (kill the pid in'
idle+=' ~/jaxft-train.pid: SIGTERM saves a checkpoint first)" >&2; exit 1; fi'
if [[ $ship == git ]]; then
  on_workers "$idle; rm -rf jaxft && git clone -q $(printf %q "$repo") jaxft && git -C jaxft checkout -q $(printf %q "$ref") && $keep_runs"
else
  archive=$(mktemp -d)/jaxft.tar.gz
  git -C "$here" archive --format=tar.gz -o "$archive" "$ref"
  gcloud_ compute tpus tpu-vm scp "$archive" "$name:jaxft.tar.gz" "${common[@]}" --worker=all
  rm -rf "$(dirname "$archive")"
  on_workers "$idle; rm -rf jaxft && mkdir jaxft && tar -xzf jaxft.tar.gz -C jaxft && $keep_runs"
fi
# jax >= 0.7 needs Python >= 3.11, and the TPU runtimes' Ubuntu 22.04 has 3.10 (and no venv
# module): take the first python3.1x with venv that is new enough, or install Ubuntu's 3.11.
pick_python='{ py=; for p in python3.13 python3.12 python3.11 python3; do $p -c'
pick_python+=' "import sys, ensurepip; sys.exit(sys.version_info < (3, 11))" 2>/dev/null &&'
pick_python+=' { py=$p; break; }; done; [ -n "$py" ] || { apt_get="sudo DEBIAN_FRONTEND=noninteractive'
pick_python+=' apt-get -o DPkg::Lock::Timeout=600"; $apt_get update -qq &&'
pick_python+=' $apt_get install -y -qq python3.11-venv && py=python3.11; }; }'
on_workers "cd jaxft && $pick_python && \$py -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
train="python -m jaxft.train --config.distributed.enabled=True$(printf ' %q' "${train_args[@]}")"
if [[ -n $detach ]]; then  # Its own session (setsid), so no hangup of ssh's reaches it.
  on_workers "cd jaxft && . .venv/bin/activate && { setsid nohup $train >> ../jaxft-train.log 2>&1 < /dev/null & echo \$! > ../jaxft-train.pid; }"
  echo "launch_tpu.sh: training detached on every worker of $name (log: ~/jaxft-train.log); follow it:"
  printf '  gcloud compute tpus tpu-vm ssh %q' "$name"; printf ' %q' "${common[@]}"
  printf ' --worker=0 --command=%q\n' 'tail -n 50 -f jaxft-train.log'
  exit 0
fi
status=0
on_workers "cd jaxft && . .venv/bin/activate && $train" || status=$?
exit $status  # (--delete: the EXIT trap above.)
