#!/usr/bin/env bash
# Our reward-model ports against the reference packages (hpsv2x, image-reward): the same
# checkpoint files, images and captions must score within 1e-4. See bench/reference/*.py.
#
#   bench/reference_check.sh           # reuses the reference venv when its pins are unchanged
#   bench/reference_check.sh --fresh   # rebuilds it (~3 min, ~6 GB: torch with CUDA libraries)
#
# Needs the project venv (.venv, `make install`) and the package index; nothing else is
# downloaded. The reference venv and the case folder live in $SMPO_REFERENCE_DIR (default
# ${TMPDIR:-/tmp}/smpo-reference-check), never in the repository. Exits 1 on a mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT_PYTHON=${PROJECT_PYTHON:-$PWD/.venv/bin/python}
BASE_PYTHON=${REFERENCE_PYTHON:-$(command -v python3.11 || command -v python3)}
WORK=${SMPO_REFERENCE_DIR:-${TMPDIR:-/tmp}/smpo-reference-check}
VENV=$WORK/venv
PINS=(bench/reference/requirements.txt bench/reference/requirements-nodeps.txt)
OPEN_CLIP=open-clip-torch==3.3.0  # ships CLIP's BPE vocabulary; read from the wheel, not installed
started=$SECONDS

if [[ ! -x $PROJECT_PYTHON ]]; then
  echo "no project venv at $PROJECT_PYTHON: run 'make install' first" >&2
  exit 2
fi
mkdir -p "$WORK"
if [[ ${1:-} == --fresh ]]; then
  rm -rf "$VENV"
fi
if ! cat "${PINS[@]}" | cmp -s - "$VENV/.smpo-pins"; then
  echo "building the reference venv in $VENV (log: $WORK/install.log)"
  rm -rf "$VENV"
  "$BASE_PYTHON" -m venv "$VENV"
  {
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -r bench/reference/requirements.txt
    "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation \
      -r bench/reference/requirements-nodeps.txt
  } >"$WORK/install.log" 2>&1 || { tail -n 30 "$WORK/install.log" >&2; exit 1; }
  cat "${PINS[@]}" >"$VENV/.smpo-pins"
  echo "reference venv ready: $((SECONDS - started)) s, $(du -sh "$VENV" | cut -f1)"
fi

"$VENV/bin/pip" download --quiet --no-deps "$OPEN_CLIP" -d "$WORK/wheels" \
  >>"$WORK/install.log" 2>&1 || { tail -n 30 "$WORK/install.log" >&2; exit 1; }
wheel=$(ls "$WORK"/wheels/open_clip_torch-3.3.0-*.whl)

case_dir=$WORK/case
rm -rf "$case_dir"
"$PROJECT_PYTHON" bench/reference/ports.py prepare "$case_dir"
step=$SECONDS
"$VENV/bin/python" bench/reference/reference.py "$case_dir"
echo "reference models built and scored: $((SECONDS - step)) s"
status=0
"$PROJECT_PYTHON" bench/reference/ports.py compare "$case_dir" --clip-tokenizer "$wheel" || status=$?
echo "reference check: $((SECONDS - started)) s in all"
exit "$status"
