#!/usr/bin/env bash
# Proves that the CUDA sources of moe_runtime._C compile, on a machine with nvcc but no GPU.
#
# Creates a throwaway venv with a CUDA build of torch, builds the extension from a copy of the
# repository with MOE_RUNTIME_FORCE_CUDA=1, and checks that the shared object holds device code
# for every requested architecture and the CUDA kernels. Nothing is imported or run on a GPU.
#
# Environment:
#   CUDA_HOME                 CUDA toolkit (default /usr/local/cuda)
#   TORCH_CUDA_ARCH_LIST      architectures to build (default "8.0;9.0")
#   TORCH_SPEC                torch requirement to install (default torch==2.14.1, a CUDA 13 build)
#   PYTHON                    interpreter for the venv (default python3)
#   MOE_CUDA_CHECK_VENV       reuse (or create and keep) this venv instead of a throwaway one
#   MAX_JOBS                  parallel compile jobs (default 2)
# Exit status: 0 PASS or SKIP (no nvcc), 1 FAIL.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export MOE_RUNTIME_FORCE_CUDA=1
unset MOE_RUNTIME_NO_EXT
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

pip_install() {
  "$VENV/bin/pip" install "$@" >>"$WORK/pip.log" 2>&1 || { tail -n 30 "$WORK/pip.log" >&2; fail "pip install $*"; }
}

# cuobjdump of the toolkit or PATH, else one the venv's packages ship (triton's, or PyPI's
# nvidia-cuda-cuobjdump installed on demand): minimal toolkits have nvcc but no cuobjdump.
find_cuobjdump() {
  local tool
  for tool in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)"; do
    [[ -n "$tool" && -x "$tool" ]] && { echo "$tool"; return; }
  done
  tool=$(find "$VENV" -path '*/bin/cuobjdump' -type f | head -n 1)
  if [[ -z "$tool" ]]; then
    pip_install nvidia-cuda-cuobjdump
    tool=$(find "$VENV" -path '*/bin/cuobjdump' -type f | head -n 1)
  fi
  echo "$tool"
}

if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  command -v nvcc >/dev/null && fail "nvcc is on PATH but not in CUDA_HOME=$CUDA_HOME; set CUDA_HOME"
  echo "SKIP: nvcc not found (looked for $CUDA_HOME/bin/nvcc and on PATH)"
  exit 0
fi
export PATH="$CUDA_HOME/bin:$PATH"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/moe-cuda-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
VENV=${MOE_CUDA_CHECK_VENV:-$WORK/venv}
START=$SECONDS

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== creating venv $VENV and installing $TORCH_SPEC (large download or local files; be patient)"
  "${PYTHON:-python3}" -m venv "$VENV"
  pip_install "$TORCH_SPEC"
  pip_install setuptools wheel ninja numpy
fi
PY="$VENV/bin/python"
TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
[[ -n "$TORCH_CUDA" ]] || fail "$TORCH_SPEC in $VENV is not a CUDA build"
echo "== torch $("$PY" -c 'import torch; print(torch.__version__)') (CUDA $TORCH_CUDA), $("$CUDA_HOME/bin/nvcc" --version | tail -1)"

# Build from a copy so the work tree (and its in-place CPU build) is left alone.
mkdir -p "$WORK/src/moe_runtime"
cp -r "$REPO/setup.py" "$REPO/pyproject.toml" "$REPO/csrc" "$WORK/src/"
cp "$REPO/moe_runtime/__init__.py" "$WORK/src/moe_runtime/"
[[ -f "$REPO/README.md" ]] && cp "$REPO/README.md" "$WORK/src/"

echo "== building moe_runtime._C for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS"
(cd "$WORK/src" && "$PY" setup.py build_ext --build-temp "$WORK/temp" --build-lib "$WORK/lib") \
  >"$WORK/build.log" 2>&1 || { tail -n 60 "$WORK/build.log" >&2; fail "the extension did not build"; }

SO=$(find "$WORK/lib" -name '_C*.so' | head -n 1)
[[ -n "$SO" ]] || fail "no _C*.so was produced"
CUOBJDUMP=$(find_cuobjdump)
[[ -n "$CUOBJDUMP" ]] || fail "no cuobjdump to inspect the device code with"
ELFS=$("$CUOBJDUMP" --list-elf "$SO") || fail "cuobjdump could not read $SO"
IFS=';' read -r -a ARCHS <<<"${TORCH_CUDA_ARCH_LIST// /;}"
for arch in "${ARCHS[@]}"; do
  arch=${arch%%+*}  # "8.0+PTX" -> "8.0"
  sm="sm_${arch//./}"
  grep -q "\.${sm}\.cubin" <<<"$ELFS" || fail "no $sm device code in $SO"
  KERNELS=$("$CUOBJDUMP" --gpu-architecture "$sm" --dump-elf-symbols "$SO" | c++filt)
  for kernel in remap_kernel invert_kernel; do
    grep -q "moe_runtime::.*${kernel}(" <<<"$KERNELS" || fail "$sm device code lacks the kernel $kernel"
  done
done
HOST_SYMBOLS=$(nm -C "$SO")
for symbol in reroute_permute_cuda TORCH_LIBRARY_IMPL_static_init_moe_runtime_CUDA; do
  grep -q "$symbol" <<<"$HOST_SYMBOLS" || fail "host symbol $symbol missing from $SO"
done

echo "$ELFS" | sed 's/^/   /'
echo "PASS: CUDA sources compiled for ${TORCH_CUDA_ARCH_LIST} in $((SECONDS - START)) s ($(basename "$SO"))"
