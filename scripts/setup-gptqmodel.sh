#!/usr/bin/env bash
# Best effort: GPTQModel 7.6.0 into its own folder (.venv/gptq-site), outside the venv's
# site-packages. It pins numpy and pulls datasets/pandas, and once importable it changes how
# PEFT imports, so it must not live in the main environment. Prints the folder on success.
# optimum is there (PEFT only checks its version, nothing imports it) because PEFT refuses to
# build any LoRA model while gptqmodel is importable without optimum >= 1.24.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${LQMOD_GPTQ_SITE:-.venv/gptq-site}
if [ ! -f "$SITE/.complete-2" ]; then
  rm -rf "$SITE.tmp"
  if GPTQMODEL_CPU_WORKERS=2 .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation \
      --target "$SITE.tmp" gptqmodel==7.6.0 Defuser==0.0.28 Device-SMI==0.5.7 LogBar==0.4.15 \
      PyPcre==0.6.4 TokeNicer==0.0.14 optimum==2.3.0 >&2; then
    touch "$SITE.tmp/.complete-2"
    rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
  else
    rm -rf "$SITE.tmp"
    echo "setup-gptqmodel: GPTQModel could not be installed; its comparison tests will skip" >&2
    exit 1
  fi
fi
echo "$SITE"
