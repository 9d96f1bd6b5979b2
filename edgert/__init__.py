"""edgert: an on-device LLM runtime for Apple Silicon on MLX.

    import edgert
    model, tokenizer = edgert.load()            # the embedded default model
    print(edgert.generate(model, tokenizer, "Hello", max_tokens=32))
"""

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "__version__"]


def __getattr__(name):
    # Keep `import edgert` (and so the CLI's start-up) free of the MLX import.
    if name == "load":
        from .package import load

        return load
    if name in ("generate", "stream_generate"):
        from . import generation as g

        return getattr(g, name)
    raise AttributeError(name)
