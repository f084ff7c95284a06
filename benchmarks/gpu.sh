#!/usr/bin/env bash
# The GPU check in one call (issue 24): installs what the GPU machine lacks from a carried
# wheelhouse, then runs `python3 -m benchmarks.gpu_check` (benchmarks/gpu_check.py says what
# it measures and what its JSON holds). On a machine without CUDA it runs the dry mode.
#
# 1. Here, on the project's CPU machine, from the project root, once (needs PyPI; ~27 MB):
#        bash benchmarks/gpu.sh --prepare
#    It runs ../shared/tools/gpu-wheelhouse.sh (dask, distributed, zarr, astropy, sep,
#    dask-cuda, ... into .whl/, which .gitignore and .git/info/exclude keep out of git) and
#    adds the wheels that script leaves out but the GPU image also lacks: tornado
#    (distributed's), msgspec and google-crc32c (zarr >= 3.4's); then, where the wheelhouse
#    took another version than this project's .venv has (zarr 3.4 against 3.1, say), it
#    swaps in the .venv's, the versions the test suite passes with. GalSim is not needed:
#    the check writes its survey with numpy.
# 2. On the device machine (the device tool's `run`, in the root of a copy of the working
#    tree; .whl/ is ignored by git, so it travels only when `carry` names it; the working
#    tree plus .whl/ is about 35 MB of the 64 MiB limit). One call, carry [".whl"]:
#        bash benchmarks/gpu.sh
#    with timeout_s 600. The check itself is sized to end within 8 minutes (1024² x 20
#    epochs; about 30 s of that is the install); BUDGET_S (default 420) stops it from
#    starting a CPU run after that many seconds, and the reports are rewritten after every
#    step, so a call cut short still returns what was measured.
#    Reports go to $OUT when it is set (the device tool's return folder: gpu_check.json,
#    gpu_check.md, gpu_check.log and one run.json per run, 7 files), else to
#    bench-out/gpu-check (ignored by git); the survey and the runs' outputs go to $WORK
#    (default /tmp/gpu-check).
#    Arguments after the script's name go to gpu_check (--size, --epochs, --seconds,
#    --cpu-workers, --dry, ...): e.g. `bash benchmarks/gpu.sh --size 2048 --epochs 10`.
# 3. Here: copy the figures into benchmarks/RESULTS.md with the device named.
#
# Dry mode here (what tests/test_gpu_check.py runs; well under a minute):
#        bash benchmarks/gpu.sh --dry        (or .venv/bin/python -m benchmarks.gpu_check --dry)
set -euo pipefail
cd "$(dirname "$0")/.."

get() {  # wheels for the GPU machine's Python (3.12, x86-64)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .whl "$@" 2>&1 | grep -v 'is ignored' || true
}

if [[ ${1:-} == --prepare ]]; then
  bash ../shared/tools/gpu-wheelhouse.sh
  get tornado msgspec google-crc32c
  # the versions this project is tested with (its .venv), where the wheelhouse took others
  if [[ -x .venv/bin/python ]]; then
    for name in dask distributed zarr numcodecs astropy sep tornado; do
      v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null) || continue
      for f in .whl/"${name}"-*.whl; do  # one version of each: two stop the install
        [[ -e $f && $f != .whl/${name}-${v}-* ]] && rm -f "$f"
      done
      compgen -G ".whl/${name}-${v}-*.whl" > /dev/null || get "${name}==${v}"
    done
  fi
  for n in dask distributed zarr numcodecs astropy sep tornado msgspec google_crc32c dask_cuda; do
    compgen -G ".whl/${n}-*.whl" > /dev/null || { echo "gpu.sh --prepare: no ${n} wheel in .whl/" >&2; exit 1; }
  done
  dupes=$(ls .whl | sed -E 's/-[0-9].*//' | sort | uniq -d)
  [[ -z $dupes ]] || { echo "gpu.sh --prepare: two versions of ${dupes} in .whl/" >&2; exit 1; }
  ls .whl
  du -sh .whl
  exit 0
fi

if [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python  # the project's machine: its virtual environment has everything
else
  PY=python3  # the GPU machine: its image's Python (torch), plus the carried wheels
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  else
    echo "gpu.sh: no .whl/ here (prepare it with 'bash benchmarks/gpu.sh --prepare' and carry it)" >&2
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONUNBUFFERED=1
REPORTS=${OUT:-bench-out/gpu-check}
mkdir -p "$REPORTS"
"$PY" -m benchmarks.gpu_check --out "$REPORTS" --work "${WORK:-/tmp/gpu-check}" \
  --budget-s "${BUDGET_S:-420}" "$@" 2>&1 | tee "$REPORTS/gpu_check.log"
