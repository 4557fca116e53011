#!/usr/bin/env bash
# fastai is a peer to compare against, never a dependency of graft: it lives in the benchmark's
# own virtual environment (bench/.venv-fastai), which sees the system's torch (no second copy).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv --system-site-packages .venv-fastai
.venv-fastai/bin/python -m pip install -q "fastai==2.8.12"
.venv-fastai/bin/python -c "import fastai, torch; print('fastai', fastai.__version__, 'torch', torch.__version__)"
