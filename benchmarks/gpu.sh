#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, CUDA builds of torch, JAX and CuPy already
# installed, and no network: installs this project without dependencies (the pure-Python
# ones it may lack come as wheels from build/gpu-wheels, filled by `make gpu-wheels`),
# runs the conformance suite on the GPU backends (JAX on its default device, CuPy; the
# conformance registry's torch rows are CPU-only), the torch layers on CUDA against the
# float64 reference, the torch and JAX benchmarks on the GPU, and writes report.md and
# report.json.  Budget: under 8 minutes.
#
#   benchmarks/gpu.sh [--dry-run] [--out DIR] [--python PYTHON]
#
# --dry-run: the same steps on the CPU with tiny sizes and nothing installed (CI runs it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
dry_run=0
out="$root/build/gpu-results"
python="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out="$2"; shift ;;
        --python) python="$2"; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out"
cd "$root"

if [ "$dry_run" = 1 ]; then
    device=cpu
    conformance_backends="torch-modules,jax-adapter"
    conformance_case=(--case rank4_channels_first --no-properties)
    bench_torch=(--device cpu --rounds-scale 0.02 --no-compile --only "1d (256")
    bench_jax=(--rounds 3 --budget 0.2)
else
    device=cuda
    conformance_backends="torch,torch-modules,jax,jax-adapter,flax-linen,cupy,layer-cupy"
    conformance_case=()
    bench_torch=(--device cuda --rounds-scale 0.5)
    bench_jax=(--budget 2)
    # the project without dependencies; pure-Python dependencies from the carried wheels
    if compgen -G "$root/build/gpu-wheels/*.whl" > /dev/null; then
        "$python" -m pip install --no-index --no-deps --quiet "$root"/build/gpu-wheels/*.whl
    fi
    "$python" -m pip install --no-index --no-deps --no-build-isolation --quiet "$root"
fi

status=0
run() {  # run NAME TIMEOUT COMMAND...: log to $out/NAME.log, record its exit status
    local name="$1" limit="$2"; shift 2
    local start=$SECONDS rc=0
    timeout "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
    echo "$name $rc $((SECONDS - start))" >> "$out/steps.txt"
    [ "$rc" = 0 ] || status=1
}
: > "$out/steps.txt"
"$python" - > "$out/environment.txt" 2>&1 <<'PY' || true
import importlib
for name in ("torch", "jax", "cupy", "numpy", "array_api_compat"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # report what is missing, go on
        print(name, "unavailable:", type(error).__name__)
try:
    import torch
    print("torch cuda:", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception:
    pass
try:
    import jax
    print("jax devices:", jax.devices())
except Exception:
    pass
PY
run conformance 180 "$python" -m portable_brn.cli conformance --backend "$conformance_backends" \
    "${conformance_case[@]}" --json "$out/conformance.json"
run torch-layers 60 "$python" "$here/gpu_check_torch.py" --device "$device" \
    --json "$out/torch-layers.json"
run bench-torch 180 "$python" "$here/bench_torch.py" "${bench_torch[@]}" \
    --json "$out/bench-torch.json"
run bench-jax 90 "$python" "$here/bench_jax.py" "${bench_jax[@]}"

"$python" - "$out" "$device" "$dry_run" <<'PY'
import json, pathlib, sys
out, device, dry_run = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
steps = [line.split() for line in (out / "steps.txt").read_text().splitlines()]
report = {"device": device, "dry_run": dry_run,
          "environment": (out / "environment.txt").read_text().splitlines(),
          "steps": [{"step": s, "exit": int(rc), "seconds": int(t)} for s, rc, t in steps]}
for name in ("conformance", "torch-layers", "bench-torch"):
    path = out / f"{name}.json"
    report[name] = json.loads(path.read_text()) if path.exists() else None
(out / "report.json").write_text(json.dumps(report, indent=1))
lines = [f"# GPU report ({'dry run on the CPU' if dry_run else device})", "",
         *[f"    {line}" for line in report["environment"]], "",
         "| step | exit | seconds |", "| --- | --- | --- |",
         *[f"| {s} | {rc} | {t} |" for s, rc, t in steps]]
for name in ("torch-layers", "bench-torch", "bench-jax"):
    log = out / f"{name}.log"
    if log.exists():
        lines += ["", f"## {name}", "", "```", log.read_text().strip()[-6000:], "```"]
(out / "report.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
PY
exit "$status"
