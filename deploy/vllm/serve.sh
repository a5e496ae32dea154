#!/usr/bin/env bash
# Serve the base model with vLLM's OpenAI-compatible server, LoRA adapters loaded at run time.
#   deploy/vllm/serve.sh MODEL_DIR [PORT]      (then OUTCOMELOOP_GENERATION_BACKEND=vllm)
# On CPU, float32 is faster than bfloat16 on machines without AVX-512 and matches HF logprobs.
# --generation-config vllm: ignore the model's generation_config.json, whose sampling defaults
# (repetition_penalty, top_k, min_p, ...) vLLM would otherwise apply to every request that does
# not set them; the served distribution must be the one policy improvement scores.
set -euo pipefail
MODEL=${1:?usage: serve.sh MODEL_DIR [PORT]}
PORT=${2:-8001}
VENV=${VLLM_VENV:-.venv-vllm}
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-auto}
# vLLM-CPU keeps one core out of its OpenMP threads for its front end when asked to; on a small
# machine that is half of it. 0: every core decodes (override where the front end starves).
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --host 127.0.0.1 --port "$PORT" --enable-lora --max-lora-rank "${VLLM_MAX_LORA_RANK:-16}" \
  --max-loras "${VLLM_MAX_LORAS:-4}" --dtype "${VLLM_DTYPE:-float32}" \
  --max-model-len "${VLLM_MAX_MODEL_LEN:-2048}" --generation-config vllm
