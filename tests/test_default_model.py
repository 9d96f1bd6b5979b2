"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 + Q8_0 GGUF) end to end:
edgert against transformers reading the same GGUF, and mlx-lm loading edgert's package."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_map

import edgert
from edgert.package import load_model
from edgert.paths import default_model_gguf

PROMPT = ("<|im_start|>user\nWrite a haiku about the sea, then explain why tides happen. "
          "Ünïcödé 東京 🚀 `x = f(y)`<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def reference_logits(smollm_package):
    import transformers

    gguf = default_model_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32)
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    return ids, logits


def test_logits_agree_with_transformers_on_the_same_gguf(smollm_package, reference_logits):
    ids, ref = reference_logits
    model, _ = load_model(smollm_package)
    ours = np.array(model(mx.array([ids])))[0]
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_mlx_lm_loads_the_package_with_the_same_logits(smollm_package, reference_logits):
    from mlx_lm.utils import load_model as mlxlm_load

    ids, ref = reference_logits
    ours = np.array(load_model(smollm_package)[0](mx.array([ids])))[0]
    peer, _ = mlxlm_load(Path(smollm_package))
    native = np.array(peer(mx.array([ids])).astype(mx.float32))[0]  # its own float16 activations
    assert (native.argmax(-1) == ours.argmax(-1)).mean() > 0.95
    peer.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p,
                         peer.parameters()))
    theirs = np.array(peer(mx.array([ids])))[0]
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(ours).max()


def test_tokenizer_matches_transformers_on_the_prompt(smollm_package, reference_logits):
    ids, _ = reference_logits
    _, tok = edgert.load(smollm_package)
    assert tok.encode(PROMPT, add_special_tokens=False) == ids


def test_greedy_answer_knows_paris(smollm_package):
    model, tok = edgert.load(smollm_package)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    text = edgert.generate(model, tok, tok.encode(prompt, add_special_tokens=False), max_tokens=32)
    assert "Paris" in text


def test_seeded_sampling_is_repeatable(smollm_package):
    model, tok = edgert.load(smollm_package)
    run = lambda seed: edgert.generate(model, tok, "Once upon a time", max_tokens=16, temp=0.9,
                                       top_p=0.95, seed=seed)
    assert run(3) == run(3)
    assert run(3) != run(4)
