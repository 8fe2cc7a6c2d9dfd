#!/usr/bin/env bash
# Build (idempotently) the independent-reader virtual environment for the interop suite.
#
# The reader is transformers + optimum + GPTQModel on CPU (shared/reference/gptq.md §6). It needs a newer
# torch than the project's own venv, so it lives in its own environment:
#   $JGPTQ_INTEROP_VENV (default: ${JGPTQ_CACHE:-~/.cache/jgptq}/venv-interop, shared by clean clones).
# A finished build leaves a stamp file holding the pin list; a rerun with the same pins is a no-op.
# Exit status is non-zero, with the failing step named on stderr, if anything fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${JGPTQ_INTEROP_VENV:-${JGPTQ_CACHE:-$HOME/.cache/jgptq}/venv-interop}"
python="${JGPTQ_INTEROP_PYTHON:-python3}"
pins="gptqmodel==7.7.0 optimum==2.3.0 transformers==5.23.0 torch==2.14.1"
stamp="$venv/.jgptq-interop-stamp"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$pins" && -x "$venv/bin/python" ]]; then
    echo "interop venv ready: $venv"
    exit 0
fi

echo "building interop venv at $venv with: $pins" >&2
rm -f "$stamp"
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv" || { echo "setup_env.sh: '$python -m venv $venv' failed" >&2; exit 2; }
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip \
    || { echo "setup_env.sh: upgrading pip in $venv failed" >&2; exit 3; }
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install --quiet $pins \
    || { echo "setup_env.sh: 'pip install $pins' failed in $venv" >&2; exit 4; }
"$venv/bin/python" - <<'PY' || { echo "setup_env.sh: the reader packages do not import in $venv" >&2; exit 5; }
import gptqmodel, optimum, torch, transformers  # noqa: F401
print("interop venv imports OK: torch", torch.__version__, "transformers", transformers.__version__,
      "gptqmodel", gptqmodel.__version__)
PY
echo "$pins" > "$stamp"
echo "interop venv ready: $venv"
