"""Speculative decoding (edgert.speculative): greedy tokens equal plain greedy decoding with a
draft model and with prompt lookup, on KV, sliding-window and hybrid recurrent models, with
rejections happening; the CLI and the server take the flags; bad input is one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from edgert.convert.api import convert_file
from edgert.errors import EdgertError
from edgert.generation import generate_step
from edgert.models.cache import make_cache, trimmable
from edgert.package import load_model
from edgert.sample import make_sampler
from edgert.speculative import DraftModel, PromptLookup, SpecStats, lookup
from test_models import hf_model

PROMPT = [5, 17, 200, 2, 9, 11, 3, 40, 41, 42, 7, 99, 100, 101, 8, 6]


def tokens(model, prompt, n, **kw) -> tuple[list[int], list]:
    out = list(generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=n,
                             prefill_step_size=8, **kw))
    return [t for t, _ in out], [lp for _, lp in out]


def check_identical(target, drafter, n=40, ks=(1, 3, 6), prompt=PROMPT) -> list[SpecStats]:
    """Greedy speculative tokens equal plain greedy ones for each K; logprobs agree."""
    want, want_lp = tokens(target, prompt, n)
    seen = []
    for k in ks:
        stats = SpecStats()
        got, got_lp = tokens(target, prompt, n, draft=drafter, num_draft=k, stats=stats)
        assert got == want, (k, stats)
        for a, b in zip(got_lp, want_lp):
            assert mx.allclose(a, b, atol=1e-4).item()
        seen.append(stats)
    return seen


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random Llama target (float) and its own 4-bit conversion as the draft."""
    folder = tmp_path_factory.mktemp("llama") / "hf"
    hf_model("llama", folder)
    draft = convert_file(folder, folder.parent / "q4", bits=4, progress=False)
    return load_model(folder)[0], load_model(draft)[0]


def test_draft_model_gives_the_tokens_of_plain_greedy(llama):
    target, draft = llama
    for stats in check_identical(target, DraftModel(draft)):
        assert 0 < stats.acceptance < 1, stats  # drafts accepted and drafts rejected
        assert stats.passes < 39  # fewer target passes than tokens


def test_prompt_lookup_on_a_repetitive_prompt(llama):
    target, _ = llama
    prompt = [3, 4, 5, 6, 7, 8, 9, 10] * 4 + [3, 4, 5]
    seen = check_identical(target, PromptLookup(3), prompt=prompt)
    assert all(s.accepted > 0 for s in seen), seen
    assert any(s.accepted < s.drafted for s in seen), seen  # rejections too
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2], 3, 2) == [3, 7]  # the most recent match
    assert lookup([1, 2, 3, 4, 1, 2], 2, 3) == [3, 4, 1]
    assert lookup([1, 2, 3], 2, 4) == []


def test_sliding_window_model_restores_its_window_on_rejection(tmp_path):
    """Gemma 3 with a window of 8 (RotatingKVCache, not trimmable) and a 4-bit draft of it."""
    hf_model("gemma3", tmp_path / "hf")
    target = load_model(tmp_path / "hf")[0]
    assert not trimmable(make_cache(target))
    draft = load_model(convert_file(tmp_path / "hf", tmp_path / "q4", bits=4, group_size=32,
                                    progress=False))[0]
    for stats in check_identical(target, DraftModel(draft), n=30, ks=(2, 5)):
        assert 0 < stats.acceptance < 1, stats


def test_hybrid_recurrent_model_restores_its_state_on_rejection(tmp_path):
    """Qwen 3.5 (Gated DeltaNet RecurrentCache + KV): what fails in mlx-lm (#1446). The draft
    is the model's own 4-bit conversion, itself hybrid (its cache rewinds by snapshot too)."""
    from test_qwen3_5 import hf_qwen3_5

    hf_qwen3_5("text-irregular-untied", tmp_path / "hf")
    target = load_model(tmp_path / "hf")[0]
    assert {type(c).__name__ for c in make_cache(target)} == {"RecurrentCache", "KVCache"}
    draft = load_model(convert_file(tmp_path / "hf", tmp_path / "q4", bits=4, group_size=32,
                                    progress=False))[0]
    for stats in check_identical(target, DraftModel(draft), n=30, ks=(2, 5)):
        assert 0 < stats.acceptance < 1, stats
    # a prompt that holds its own continuation once: lookup drafts it, the model half agrees
    prompt = PROMPT + tokens(target, PROMPT, 20)[0] + PROMPT
    stats = check_identical(target, PromptLookup(2), n=30, ks=(4,), prompt=prompt)[0]
    assert 0 < stats.acceptance < 1, stats


@pytest.mark.parametrize("drafted", ["draft model", "prompt lookup"])
def test_sampling_acceptance_keeps_the_target_distribution(drafted):
    """The acceptance rule: the first token out of a verification (the draft if accepted,
    else a sample from the residual) follows the target's distribution p, whatever the draft
    distribution q (a draft model's, or one-hot for prompt lookup)."""
    import numpy as np

    from edgert.speculative import accept

    p = mx.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.2] * 5])  # (k+1, V), k = 1
    q = mx.array([[0.1, 0.6, 0.1, 0.1, 0.1]])  # the draft's (k, V)
    sampler = make_sampler(1.0, seed=0)
    rng = np.random.default_rng(0)
    n, counts = 4000, np.zeros(5)
    for _ in range(n):
        d = int(rng.choice(5, p=np.array(q[0]))) if drafted == "draft model" else 1
        a, token = accept(mx.log(p), [d], mx.log(q) if drafted == "draft model" else None,
                          sampler)
        counts[d if a else token] += 1
    want = np.array(p[0]) * n
    assert (np.abs(counts - want) <= 4 * np.sqrt(want) + 2).all(), (counts, want)


def test_sampled_speculative_decoding_is_repeatable_with_a_seed(llama):
    """Sampling with top-k / top-p through both drafters: the asked-for number of tokens, the
    same tokens for the same seed, drafts accepted and rejected."""
    target, draft = llama
    seen = []
    for drafter in (DraftModel(draft), PromptLookup(2)):
        runs = []
        for _ in range(2):
            stats = SpecStats()
            sampler = make_sampler(0.8, top_p=0.95, top_k=40, seed=7)
            runs.append(tokens(target, PROMPT * 2, 24, sampler=sampler, draft=drafter,
                               num_draft=3, stats=stats)[0])
            assert len(runs[-1]) == 24
        assert runs[0] == runs[1]
        seen.append(stats)
    assert all(s.drafted > 0 for s in seen) and any(s.accepted > 0 for s in seen)
    assert any(s.accepted < s.drafted for s in seen)


@pytest.fixture(scope="module")
def other_vocab(smollm_package, tmp_path_factory):
    """SmolLM2's package with two token ids swapped in its vocabulary (weights linked)."""
    folder = tmp_path_factory.mktemp("other-vocab")
    for f in smollm_package.iterdir():
        (folder / f.name).symlink_to(f)
    data = json.loads((smollm_package / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_vocabularies_must_match(smollm_package, other_vocab):
    from edgert.speculative import check_vocabularies
    from edgert.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm_package)
    check_vocabularies(tok, load_tokenizer(smollm_package))
    with pytest.raises(EdgertError, match="vocabulary differs"):
        check_vocabularies(tok, load_tokenizer(other_vocab))


def edgert(*args, check=True) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "edgert", *args], capture_output=True,
                         text=True, timeout=300)
    if check:
        assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def smollm_q4(smollm_package, tmp_path_factory):
    """SmolLM2 re-quantized to 4-bit g64 by edgert: the draft for the embedded Q4_1 + Q8_0."""
    return convert_file(smollm_package, tmp_path_factory.mktemp("smollm-q4") / "q4", bits=4,
                        progress=False)


def plain_chat_tokens(package, text: str, n: int) -> list[int]:
    """Plain greedy tokens for one user message, as `edgert generate` and the server prompt."""
    from edgert.tokenizer import load_tokenizer

    tok = load_tokenizer(package)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                     add_special_tokens=False)
    out = tokens(load_model(package)[0], ids, n)[0]
    return out[:next((i for i, t in enumerate(out) if t in tok.eos_token_ids), len(out))]


def test_cli_generate_with_a_draft_model_and_prompt_lookup(smollm_package, smollm_q4):
    """SmolLM2 (Q4_1 + Q8_0) as target, its 4-bit re-quantization as draft: the tokens of
    plain greedy generation; --json and the stats line report the acceptance."""
    from edgert.tokenizer import load_tokenizer

    text = "List the days of the week."
    want = plain_chat_tokens(smollm_package, text, 10)
    args = ["generate", str(smollm_package), "-p", text, "-n", "10"]
    spec = json.loads(edgert(*args, "--json", "--draft-model", str(smollm_q4),
                             "--num-draft", "2").stdout)
    assert spec["tokens"] == want
    assert 0 < spec["acceptance"] < 1 and spec["draft_tokens"] > 0
    look = edgert(*args, "--prompt-lookup", "2")
    assert "drafts accepted" in look.stderr
    assert look.stdout.strip() == load_tokenizer(smollm_package).decode(want).strip()


def test_cli_bad_input_is_one_line(smollm_package, other_vocab):
    for bad in (["--num-draft", "0", "--prompt-lookup", "2"], ["--prompt-lookup", "0"],
                ["--num-draft", "2"], ["--prompt-lookup", "2", "--draft-model", "x"],
                ["--draft-model", str(other_vocab)]):
        run = edgert("generate", str(smollm_package), "-p", "hi", *bad, check=False)
        assert run.returncode != 0, (bad, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, (bad, run.stderr)
    assert "vocabulary" in run.stderr
    with pytest.raises(EdgertError, match="vocabulary"):
        from edgert.engine import Engine

        Engine(smollm_package, draft_model=other_vocab)


def test_server_with_a_draft_model_answers_as_plain_generation(smollm_package, smollm_q4):
    """The official openai client against `serve --draft-model`: streamed and not, the text of
    plain greedy generation; usage counts accepted and rejected drafts."""
    import openai

    from edgert.tokenizer import load_tokenizer
    from server_util import running_server

    text = "Name three colours."
    want = load_tokenizer(smollm_package).decode(plain_chat_tokens(smollm_package, text, 10))
    messages = [{"role": "user", "content": text}]
    with running_server(smollm_package, model_id="m", draft_model=smollm_q4,
                        num_draft=2) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                           max_tokens=10)
        chunks = list(client.chat.completions.create(
            model="m", messages=messages, temperature=0, max_tokens=10, stream=True))
    assert r.choices[0].message.content == want
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens > 0
