#!/usr/bin/env bash
# One short check for a machine with an accelerator: times one MoE layer (fwd+bwd) and the tiny
# training step on the default JAX backend and prints MFU from the analytic FLOPs. Installs nothing.
# On a CPU-only machine it says "no accelerator" and runs the same quick versions on the CPU.
#   bash experiments/gpu_check.sh            (OUT=/some/dir to keep the JSON; PYTHON=... to pick one)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
backend=$("$py" -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -1)
if [ "$backend" = "cpu" ]; then
  echo "no accelerator: JAX's backend is cpu; running the quick CPU versions"
  counts=1,8
else
  counts=1,$("$py" -c 'import jax; print(jax.device_count())' 2>/dev/null | tail -1)
  counts=${counts%,1}
  echo "accelerator: $backend"
fi
"$py" experiments/bench_moe.py --quick --repeats 5 --device "$backend" --out "$out" > "$out/bench_moe.log"
"$py" experiments/bench_train.py --quick --steps 5 --device "$backend" --device-counts "$counts" --out "$out" \
  > "$out/bench_train.log"
JAX_PLATFORMS=$backend "$py" - "$out" <<'PY'
import json, pathlib, sys
import jax
from litejax.model import bounds
from litejax.perf import chips
from litejax.config import load_config
sys.path.insert(0, 'experiments')
from harness import dense_overrides
out = pathlib.Path(sys.argv[1])
kind = jax.devices()[0].device_kind
peak = chips.peak_flops_for_device_kind(kind)
moe_cfg = load_config('configs/tiny.yaml')
cfgs = {'moe': moe_cfg, 'dense': load_config('configs/tiny.yaml', dense_overrides(moe_cfg))}
for r in json.loads((out / 'bench_moe.json').read_text()):
  if r['impl'] in ('dense', 'litejax_auto') and r.get('median_seconds'):
    print(f"moe layer  {r['impl']:13s} E={r['experts']:4d}  {r['median_seconds'] * 1e3:8.2f} ms"
          f"  ({r['ratio_to_dense']:.2f}x dense)")
for r in json.loads((out / 'bench_train.json').read_text()):
  if not r.get('tokens_per_second'):
    print(f"train step {r['model']:5s} devices={r['devices']}  failed: {r.get('error')}")
    continue
  flops = bounds.train_flops_per_token(cfgs[r['model']], r['batch'] * r['seq_len'] // r['devices'])
  mfu = f"{r['tokens_per_second'] * flops / (peak * r['devices']):.1%}" if peak else f'n/a (no known peak for {kind!r})'
  print(f"train step {r['model']:5s} devices={r['devices']}  {r['tokens_per_second']:10.0f} tokens/s  MFU {mfu}")
print(f'device: {kind}; JSON in {out}')
PY
