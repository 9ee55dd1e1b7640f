#!/usr/bin/env bash
# Builds llama.cpp from the source vendored in the llama-cpp-python sdist on PyPI into
# $SPECDEC_CACHE/llama.cpp/<version> (~/.cache/specdec by default; never in git), and installs
# llama-cpp-python's Python bindings (only them: they load the libraries built here) into .venv.
# Two users: the llama.cpp engine backend (`--backend llama.cpp`) needs the libraries (about 4-6
# minutes on 2 cores: `--libs-only`); the benchmark's peer also needs llama-server and llama-bench
# (about 6 minutes more on the AVX-512 Xeon, 15 on the AMD EPYC; CI builds everything). A second run does nothing. Prints the binaries' folder:
# `python -m specdec.bench` finds it there (or at $SPECDEC_LLAMA_CPP).
#
# GGML_NATIVE=OFF with the x86 features listed, AMX off: a native build turns AMX on where the CPU
# has it, and on the 2-core Sapphire Rapids Xeon this project is measured on its first multi-row
# pass segfaults in ggml_backend_amx_mul_mat (seen 2026-12-08 with llama-bench on Qwen2.5-Coder
# Q4_K_M, although AMX itself runs there; llama.cpp issue 20824, closed unfixed); an earlier native
# build died with "Illegal instruction". The AVX-512 flags are set only where /proc/cpuinfo has them.
set -euo pipefail
VERSION=0.3.36
PY=${PY:-$(dirname "$0")/../.venv/bin/python}
libs_only=${1:-}
root=${SPECDEC_CACHE:-$HOME/.cache/specdec}/llama.cpp/$VERSION
bin=$root/build/bin
sdist=$root/llama_cpp_python-$VERSION.tar.gz
built() {
  [ -f "$bin/libllama.so" ] && { [ "$libs_only" = --libs-only ] || { [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ]; }; }
}
bindings() { "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llama_cpp") is None)' 2>/dev/null; }
if built && bindings; then
  echo "$bin"
  exit 0
fi
mkdir -p "$root"
if [ ! -f "$sdist" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
  mv "$work/llama_cpp_python-$VERSION.tar.gz" "$sdist"
fi
if [ ! -f "$root/src/CMakeLists.txt" ]; then
  tar xzf "$sdist" -C "$root" "llama_cpp_python-$VERSION/vendor/llama.cpp"
  rm -rf "$root/src" && mv "$root/llama_cpp_python-$VERSION/vendor/llama.cpp" "$root/src"
  rm -rf "$root/llama_cpp_python-$VERSION"
fi
has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
cmake -S "$root/src" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" \
  -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DBUILD_SHARED_LIBS=ON >&2
cmake --build "$root/build" -j"$(nproc)" --target llama >&2
if [ "$libs_only" != --libs-only ]; then
  cmake --build "$root/build" -j"$(nproc)" --target llama-bench llama-server >&2
fi
# the bindings alone (LLAMA_BUILD=OFF: no second build); diskcache: llama_cpp's __init__ imports it
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet --no-deps "$sdist" >&2
"$PY" -m pip install --quiet diskcache >&2
echo "$bin"
