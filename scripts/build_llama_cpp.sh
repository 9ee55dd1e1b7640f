#!/usr/bin/env bash
# Builds llama.cpp, the CPU peer the benchmark compares against, from the source vendored in the
# llama-cpp-python sdist on PyPI, into $SPECDEC_CACHE/llama.cpp/<version> (~/.cache/specdec by
# default; never in git). About 20 minutes on 2 cores; a second run does nothing. Prints the
# folder of the binaries: `python -m specdec.bench` finds them there (or at $SPECDEC_LLAMA_CPP).
#
# GGML_NATIVE=OFF with the x86 features listed: a native build has died with "Illegal
# instruction" on the 2-core Xeon this project is measured on (../shared/PEERS.md). The AVX-512
# flags are set only where /proc/cpuinfo has them.
set -euo pipefail
VERSION=0.3.36
PY=${PY:-$(dirname "$0")/../.venv/bin/python}
root=${SPECDEC_CACHE:-$HOME/.cache/specdec}/llama.cpp/$VERSION
bin=$root/build/bin
if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$root"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
rm -rf "$root/src" && mv "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" "$root/src"
has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
cmake -S "$root/src" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" \
  -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$root/build" -j"$(nproc)" --target llama-bench llama-server >&2
echo "$bin"
