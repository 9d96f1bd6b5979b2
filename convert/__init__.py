"""edgert.convert: readers (GGUF, HF safetensors) and writers (MLX package, Core ML package)."""
