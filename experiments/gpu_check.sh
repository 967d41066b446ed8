#!/usr/bin/env bash
# One short check for a machine with an accelerator: times one MoE layer (fwd+bwd) and the tiny
# training step on the default JAX backend and prints MFU from the analytic FLOPs. Installs nothing.
# On a CPU-only machine it says "no accelerator" and runs the same quick versions on the CPU.
#   bash experiments/gpu_check.sh            (OUT=/some/dir to keep the JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
backend=$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null)
if [ "$backend" = "cpu" ]; then
  echo "no accelerator: JAX's backend is cpu; running the quick CPU versions"
fi
python experiments/bench_moe.py --quick --repeats 5 --device "$backend" --out "$out" > "$out/bench_moe.log"
python experiments/bench_train.py --quick --steps 5 --device "$backend" --out "$out" > "$out/bench_train.log"
python - "$out" <<'PY'
import json, pathlib, sys
import jax
from litejax import bounds, hardware
from litejax.config import load_config
out = pathlib.Path(sys.argv[1])
kind = jax.devices()[0].device_kind
peak = hardware.peak_flops_for_device_kind(kind)
cfg = load_config('configs/tiny.yaml')
for r in json.loads((out / 'bench_moe.json').read_text()):
  if r['impl'] in ('dense', 'litejax_auto') and r.get('median_seconds'):
    print(f"moe layer  {r['impl']:13s} E={r['experts']:4d}  {r['median_seconds'] * 1e3:8.2f} ms")
for r in json.loads((out / 'bench_train.json').read_text()):
  if not r.get('tokens_per_second'):
    print(f"train step {r['model']:5s} devices={r['devices']}  failed: {r.get('error')}")
    continue
  flops = bounds.train_flops_per_token(cfg, r['batch'] * r['seq_len'] // r['devices']) if r['model'] == 'moe' else None
  mfu = (f"{r['tokens_per_second'] * flops / (peak * r['devices']):.1%}" if (peak and flops) else
         f'n/a (no known peak for {kind!r})' if not peak else 'n/a (dense row)')
  print(f"train step {r['model']:5s} devices={r['devices']}  {r['tokens_per_second']:10.0f} tokens/s  MFU {mfu}")
print(f'device: {kind}; JSON in {out}')
PY
