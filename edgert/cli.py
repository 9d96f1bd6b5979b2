"""The `edgert` command: thin click commands over the library; heavy imports inside each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import EdgertError

MODEL_HELP = "an MLX package folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct)"


class Context:
    debug = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="edgert")
def cli(debug: bool):
    """edgert: run quantized LLMs on MLX; convert them for Macs and iPhones."""
    Context.debug = debug


def sampling_options(f):
    for opt in reversed([
        click.option("--max-tokens", "-n", default=256, show_default=True, help="Tokens to generate."),
        click.option("--temp", default=0.0, show_default=True, help="Temperature; 0 is greedy."),
        click.option("--top-p", default=0.0, help="Nucleus sampling mass (0 = off)."),
        click.option("--top-k", default=0, help="Keep the k most likely tokens (0 = off)."),
        click.option("--min-p", default=0.0, help="Drop tokens below min-p x the top probability."),
        click.option("--repetition-penalty", default=None, type=float, help="e.g. 1.1 (off by default)."),
        click.option("--seed", default=None, type=int, help="Random seed: same seed, same output."),
    ]):
        f = opt(f)
    return f


def sampling_kwargs(kw: dict) -> dict:
    from .sample import check_sampling

    keys = ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    check_sampling(**kw)  # before the model loads
    return {k: kw[k] for k in keys}


def quiet_coremltools() -> None:
    """coremltools logs a dozen warnings when imported on Linux (no Core ML framework, an
    untested torch): keep stderr to edgert's own line. Its errors still show."""
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)


def load_with_status(model: str | None, engine: str | None = None):
    """(model, tokenizer) for `engine` "mlx" or "coreml" (default: coreml for a .mlpackage)."""
    from rich.console import Console

    if engine is None:
        from .coreml_engine import is_coreml_package

        engine = "coreml" if is_coreml_package(model) else "mlx"
    with Console(stderr=True).status("loading model…"):
        if engine == "coreml":
            if model is None:
                raise EdgertError("--engine coreml needs a .mlpackage (make one with "
                                  "`edgert convert SRC --to coreml -o Model.mlpackage`)")
            from .coreml_engine import load_coreml

            quiet_coremltools()

            return load_coreml(model)
        from .package import load

        return load(model)


ENGINE_HELP = ("mlx, or coreml for a .mlpackage: Core ML on macOS 15+, edgert's numpy MIL "
               "interpreter elsewhere (slow). Default: coreml for a .mlpackage, else mlx.")


def coreml_export(f):
    """--to / --target / --context on `convert`: with --to coreml, write a .mlpackage."""
    import functools

    @functools.wraps(f)
    def wrapper(to, target, context, **kw):
        if to != "coreml":
            if target is not None or context is not None:
                raise EdgertError("--target and --context apply to --to coreml only")
            return f(**kw)
        from .convert.api import progress_bar
        from .convert.coreml_writer import convert_to_coreml

        quiet_coremltools()

        options = {k: kw[k] for k in ("overrides", "requantize", "scale_dtype") if k in kw}
        for k in ("bits", "group_size"):
            if kw.get(k) is not None:
                options[k] = int(kw[k])
        with progress_bar("Core ML") as progress:
            report = convert_to_coreml(kw["src"], kw["out"], context=context,
                                       target=target or "iOS18", force=kw["force"],
                                       progress=progress, **options)
        s = report["summary"]
        click.echo(f"wrote {report['path']} ({report['target']}, context {report['context']}, "
                   f"{s['parameters'] / 1e6:.0f}M parameters at {s['bits_per_weight']:.2f} "
                   f"bits/weight, {report['seconds']['total']:.0f} s)")

    wrapper = click.option("--context", type=click.IntRange(min=1), default=None,
                           help="Core ML: KV-cache length (default 2048 or the model's limit, "
                                "if less).")(wrapper)
    wrapper = click.option("--target", type=click.Choice(["iOS18", "iOS26"]), default=None,
                           help="Core ML deployment target (default iOS18; iOS26 packs 1-bit "
                                "and ternary weights tighter).")(wrapper)
    return click.option("--to", "to", type=click.Choice(["mlx", "coreml"]), default="mlx",
                        show_default=True,
                        help="mlx: an MLX package folder; coreml: a Core ML package "
                             "(OUT must end in .mlpackage).")(wrapper)


def kv_options(f):
    f = click.option("--kv-group-size", default="64", show_default=True,
                     type=click.Choice(["32", "64", "128"]), callback=lambda c, p, v: int(v),
                     help="Group size of the quantized KV cache.")(f)
    return click.option("--kv-bits", default=None, type=click.Choice(["4", "8"]),
                        callback=lambda c, p, v: None if v is None else int(v),
                        help="Store keys and values in 4 or 8 bits (full attention and "
                             "sliding windows).")(f)


def speculative_options(f):
    """--draft-model / --prompt-lookup / --num-draft (edgert.speculative)."""
    f = click.option("--num-draft", default=None, type=click.IntRange(min=1),
                     help="Speculative decoding: tokens drafted per target pass (default 4).")(f)
    f = click.option("--prompt-lookup", default=None, type=click.IntRange(min=1), metavar="N",
                     help="Speculative decoding with drafts looked up in the prompt and output "
                          "so far: what followed the last N tokens (then N-1, ... 1) before. "
                          "No draft model; good for edits of text the prompt holds.")(f)
    return click.option("--draft-model", default=None,
                        help="Speculative decoding with this smaller model (any MODEL edgert "
                             "loads, with the same vocabulary) drafting for MODEL. Greedy output "
                             "is that of plain decoding.")(f)


def check_speculative(draft_model, prompt_lookup, num_draft) -> None:
    """The speculative options make sense together (before any model loads)."""
    if draft_model is not None and prompt_lookup is not None:
        raise EdgertError("give --draft-model or --prompt-lookup, not both")
    if num_draft is not None and draft_model is None and prompt_lookup is None:
        raise EdgertError("--num-draft needs --draft-model or --prompt-lookup")


def load_drafter(draft_model, prompt_lookup, tokenizer):
    """The drafter the options ask for (None without them); a draft model with another
    vocabulary than `tokenizer`'s is refused."""
    from .speculative import DraftModel, PromptLookup, check_vocabularies

    if prompt_lookup is not None:
        return PromptLookup(prompt_lookup)
    if draft_model is None:
        return None
    if Path(draft_model).suffix == ".mlpackage":
        raise EdgertError("--draft-model needs an MLX model (a package folder or a .gguf), "
                          "not a Core ML package")
    model, draft_tok = load_with_status(draft_model, "mlx")
    check_vocabularies(tokenizer, draft_tok)
    return DraftModel(model)


def recommended_options(f):
    """Sampling options that default to the model's recommended sampling."""
    for opt in reversed([
        click.option("--max-tokens", "-n", default=1024, show_default=True,
                     help="Most tokens per reply."),
        click.option("--temp", default=None, type=float,
                     help="Temperature; 0 is greedy (default: the model's recommended sampling "
                          "from generation_config.json, else llama.cpp's: 0.8, top-k 40, "
                          "top-p 0.95, min-p 0.05)."),
        click.option("--top-p", default=None, type=float, help="Nucleus sampling mass."),
        click.option("--top-k", default=None, type=int, help="Keep the k most likely tokens."),
        click.option("--min-p", default=None, type=float,
                     help="Drop tokens below min-p x the top probability."),
        click.option("--repetition-penalty", default=None, type=float, help="e.g. 1.1."),
        click.option("--seed", default=None, type=int, help="Random seed: same seed, same output."),
    ]):
        f = opt(f)
    return f


def given_sampling(kw: dict) -> dict:
    """The sampling options given on the command line (checked), without the ones left out."""
    from .sample import check_sampling

    keys = ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    given = {k: kw[k] for k in keys if kw[k] is not None}
    check_sampling(**given)
    return given


def with_recommended(given: dict, generation_config: dict | None) -> dict:
    """Sampling keywords: the ones given on the command line, the model's for the rest."""
    from .sample import recommended_sampling

    if given.get("temp") == 0:  # greedy: the filters do not matter
        return {"top_p": 0.0, "top_k": 0, "min_p": 0.0, **given}
    return {"top_p": 0.0, "top_k": 0, "min_p": 0.0, **recommended_sampling(generation_config),
            **given}


@cli.command()
@click.argument("model", required=False)
@recommended_options
@click.option("--system", default=None, help="System prompt.")
@click.option("--engine", type=click.Choice(["mlx", "coreml"]), default=None, help=ENGINE_HELP)
@speculative_options
def chat(model, system, max_tokens, engine, draft_model, prompt_lookup, num_draft, **kw):
    """Chat with a model, streaming. /reset starts over, /exit quits; Ctrl-C stops a reply."""
    from .chat import run_chat

    given = given_sampling(kw)  # checked before the model loads
    check_speculative(draft_model, prompt_lookup, num_draft)
    if (draft_model or prompt_lookup) and (engine == "coreml" or (
            model and Path(model).suffix == ".mlpackage")):
        raise EdgertError("--draft-model and --prompt-lookup need the mlx engine")
    loaded = load_with_status(model, engine)
    draft = load_drafter(draft_model, prompt_lookup, loaded[1])
    run_chat(loaded, system=system, max_tokens=max_tokens,
             sampling=with_recommended(given, getattr(loaded[1], "generation_config", None)),
             draft=draft, num_draft=num_draft or 4)


@cli.command()
@click.argument("model")
@click.option("--prompt", "-p", required=True, help="The prompt ('-' reads standard input).")
@sampling_options
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--system", default=None, help="System prompt (with the chat template).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--engine", type=click.Choice(["mlx", "coreml"]), default=None, help=ENGINE_HELP)
@click.option("--prompt-cache", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A prompt cache from `edgert cache-prompt`: its tokens, where "
                                 "the prompt starts with them, are not computed again.")
@kv_options
@speculative_options
def generate(model, prompt, max_tokens, raw, system, as_json, engine, prompt_cache, kv_bits,
             kv_group_size, draft_model, prompt_lookup, num_draft, **kw):
    """Generate a reply to PROMPT with MODEL."""
    from .generation import stream_generate
    from .speculative import summary
    from .tokenizer import check_text

    sampling = sampling_kwargs(kw)
    check_speculative(draft_model, prompt_lookup, num_draft)
    if (draft_model or prompt_lookup) and (engine == "coreml" or Path(model).suffix == ".mlpackage"):
        raise EdgertError("--draft-model and --prompt-lookup need the mlx engine")
    if prompt == "-":
        data = sys.stdin.buffer.read()
        prompt = data.decode("utf-8", "surrogateescape")
    check_text(prompt)
    if not prompt.strip():
        raise EdgertError("empty prompt: give some text with -p")
    m, tok = load_with_status(model, engine)
    draft = load_drafter(draft_model, prompt_lookup, tok)
    text = prompt
    if not raw and tok.has_chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=raw or not tok.has_chat_template)
    cache, cached = None, 0
    if prompt_cache is not None or kv_bits:
        from .coreml_engine import CoreMLModel

        if isinstance(m, CoreMLModel):
            raise EdgertError("--prompt-cache and --kv-bits need the mlx engine")
        from .convert.api import ensure_package
        from .models.cache import make_cache, quantize_kv
        from .prefix_cache import PrefixCache

        prefix = PrefixCache(m, make=lambda: quantize_kv(make_cache(m), kv_bits, kv_group_size))
        if prompt_cache is not None:
            prefix.load(prompt_cache, ensure_package(model))
        cache, cached = prefix.fetch(ids)
    from .reasoning import ReasoningParser, opens_reasoning, reasoning_format

    fmt = None if raw else reasoning_format(tok.chat_template)  # reasoning goes to stderr
    parser = ReasoningParser(fmt, opens_reasoning(text, fmt))
    pieces, thought, tokens, last = [], [], [], None

    def emit(parts):
        for kind, piece in parts:
            (thought if kind == "reasoning" else pieces).append(piece)
            if not as_json:
                click.secho(piece, nl=False, err=kind == "reasoning",
                            dim=kind == "reasoning" or None)

    for r in stream_generate(m, tok, ids[cached:], max_tokens, prompt_cache=cache,
                             draft=draft, num_draft=num_draft or 4, history=ids[:cached],
                             **sampling):
        emit(parser.feed(r.text))
        if r.finish_reason is None:
            tokens.append(r.token)
        last = r
    emit(parser.finish())
    if as_json:
        click.echo(json.dumps({
            "text": "".join(pieces), **({"reasoning": "".join(thought)} if thought else {}),
            "tokens": tokens, "finish_reason": last.finish_reason,
            "prompt_tokens": len(ids), "cached_tokens": cached, "generation_tokens": len(tokens),
            "prompt_tps": round(last.prompt_tps, 2), "generation_tps": round(last.generation_tps, 2),
            "peak_memory_gb": round(last.peak_memory_gb, 3),
            **({"draft_tokens": last.draft_tokens, "accepted_tokens": last.accepted_tokens,
                "acceptance": round(last.acceptance or 0.0, 4)} if draft else {}),
        }, ensure_ascii=False))
    else:
        click.echo()
        click.secho(f"prompt {last.prompt_tokens} tok @ {last.prompt_tps:.1f} tok/s · "
                    f"generation {len(tokens)} tok @ {last.generation_tps:.1f} tok/s"
                    f"{summary(last)}", dim=True, err=True)


@cli.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback unless you ask for another).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model-id", default=None,
              help="The model name clients send (default: MODEL's file or folder name).")
@click.option("--max-tokens", "-n", default=512, show_default=True, type=click.IntRange(min=1),
              help="Tokens to generate when a request does not say.")
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded at once (token by token in turn); the rest wait in line.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests allowed to wait; more are refused with 503.")
@click.option("--prefix-cache-mb", default=1024, show_default=True, type=click.IntRange(min=0),
              help="Memory for cached prompt prefixes shared across requests.")
@click.option("--prompt-cache", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A prompt cache from `edgert cache-prompt` to start the prefix "
                                 "cache with.")
@kv_options
@speculative_options
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(model, host, port, model_id, max_tokens, parallel, max_queue, prefix_cache_mb,
          prompt_cache, kv_bits, kv_group_size, draft_model, prompt_lookup, num_draft,
          log_level):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health; OpenAPI at /docs)."""
    from .server import serve as run_server

    check_speculative(draft_model, prompt_lookup, num_draft)
    run_server(model, host, port, model_id=model_id, max_active=parallel, max_queue=max_queue,
               prefix_cache_bytes=prefix_cache_mb << 20, default_max_tokens=max_tokens,
               prompt_cache=prompt_cache, kv_bits=kv_bits, kv_group_size=kv_group_size,
               draft_model=draft_model, prompt_lookup=prompt_lookup,
               num_draft=num_draft or 4, log_level=log_level)


@cli.command("cache-prompt")
@click.argument("model", required=False)
@click.option("--prompt", "-p", default=None, help="Text the cache holds, as given ('-' reads "
              "standard input); generate --raw prompts that start with it reuse it.")
@click.option("--system", default=None, help="A system prompt, rendered by the chat template: "
              "chats (generate, serve) with this system prompt reuse it.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The cache file (.safetensors).")
def cache_prompt(model, prompt, system, out):
    """Compute MODEL's cache for a prompt once and save it for generate/serve --prompt-cache."""
    from .convert.api import ensure_package
    from .package import load_model
    from .prompt_cache import prefill_cache, save_prompt_cache
    from .tokenizer import load_tokenizer

    if (prompt is None) == (system is None):
        raise EdgertError("give exactly one of --prompt and --system")
    path = ensure_package(model)
    tok = load_tokenizer(path)
    if system is not None:
        if not tok.has_chat_template:
            raise EdgertError("--system needs a model with a chat template")
        text = tok.apply_chat_template([{"role": "system", "content": system}],
                                       add_generation_prompt=False)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        text = sys.stdin.read() if prompt == "-" else prompt
        if not text:
            raise EdgertError("empty prompt: nothing to cache")
        ids = tok.encode(text)
    m, _ = load_model(path)
    save_prompt_cache(out, path, ids, prefill_cache(m, ids))
    click.echo(f"wrote {out} ({len(ids)} tokens)")


def parse_overrides(ctx, param, values: tuple[str, ...]) -> dict[str, dict]:
    """('lm_head=8', '*.down_proj=6:32') -> {"lm_head": {"bits": 8}, "*.down_proj": {...}}."""
    out = {}
    for v in values:
        pattern, sep, layout = v.partition("=")
        bits, _, group = layout.partition(":")
        if not sep or not pattern or not bits.isdigit() or (group and not group.isdigit()):
            raise click.BadParameter(f"{v!r}: expected PATTERN=BITS or PATTERN=BITS:GROUP")
        out[pattern] = {"bits": int(bits), **({"group_size": int(group)} if group else {})}
    return out


@cli.command()
@coreml_export
@click.argument("src")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--bits", type=click.Choice(["0", "1", "2", "3", "4", "5", "6", "8"]), default=None,
              help="Bits for every quantized matrix (0 = float); float sources default to 4. "
                   "Exact source layouts are re-quantized only where this asks for another.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Group size (float sources default to 64).")
@click.option("--override", "overrides", multiple=True, callback=parse_overrides,
              metavar="PATTERN=BITS[:GROUP]",
              help="Per-module layout, e.g. 'lm_head=8' or '*.down_proj=6:32' (repeatable).")
@click.option("--requantize", is_flag=True,
              help="Dequantize and re-quantize GGUF types with no exact MLX layout (lossy; "
                   "the error is reported per tensor) instead of refusing them.")
@click.option("--scale-dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Scales and biases of newly quantized tensors.")
def convert(src, out, force, bits, group_size, overrides, requantize, scale_dtype):
    """Convert a checkpoint (a GGUF file, an HF safetensors folder or a Hugging Face repo id)
    into an MLX package."""
    from .convert.api import convert_file

    path = convert_file(src, out, force=force, progress=True,
                        bits=None if bits is None else int(bits),
                        group_size=None if group_size is None else int(group_size),
                        overrides=overrides, requantize=requantize, scale_dtype=scale_dtype)
    click.echo(f"wrote {path}")
    source = json.loads((path / "edgert.json").read_text()).get("source", {})
    if source.get("dropped"):  # said once: e.g. a vision tower the architecture leaves out
        click.echo(f"note: {source['dropped']}")


@cli.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--tensors", is_flag=True, help="List every tensor's mapping.")
def info(model, as_json, tensors):
    """Describe a model: architecture, parameters, bits per weight, quantization by type."""
    from .convert.api import ensure_package
    from .info import package_info, print_info

    summary = package_info(ensure_package(model))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        print_info(summary, tensors=tensors)


@cli.command()
@click.argument("package")
@click.option("--reference", "-r", "source", required=True,
              help="The checkpoint the package was converted from (GGUF or HF folder, or a "
                   "Hugging Face repo id).")
@click.option("--prompt", "-p", "prompts", multiple=True,
              help="Prompt to compare on (repeatable; default: four built-in prompts).")
@click.option("--min-top1", default=0.9, show_default=True,
              help="Fail below this top-1 agreement.")
@click.option("--max-kl", default=0.05, show_default=True,
              help="Fail above this mean KL divergence (nats).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def verify(package, source, prompts, min_top1, max_kl, as_json):
    """Compare a package's logits with a float model built from its source's dequantization."""
    from .verify import PROMPTS, verify as run_verify

    v = run_verify(package, source, tuple(prompts) or PROMPTS, min_top1, max_kl)
    if as_json:
        click.echo(json.dumps(v.as_dict(), indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{package} vs {source}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("threshold", justify="right")
        table.add_row("positions", str(v.positions), "")
        table.add_row("top-1 agreement", f"{v.top1_agreement:.4f}", f">= {min_top1}")
        table.add_row("KL mean (nats)", f"{v.kl_mean:.3g}", f"<= {max_kl}")
        table.add_row("KL max (nats)", f"{v.kl_max:.3g}", "")
        table.add_row("max |logit error|", f"{v.max_abs_logit_error:.4g}", "")
        Console().print(table)
        click.secho("PASS" if v.passed else "FAIL", fg="green" if v.passed else "red")
    if not v.passed:
        sys.exit(1)


def int_list(ctx, param, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "n_prompt", default="512", callback=int_list, help="Prompt lengths (pp), e.g. 128,512.")
@click.option("-n", "n_gen", default="128", callback=int_list, help="Generation lengths (tg).")
@click.option("-r", "reps", default=3, show_default=True, help="Repetitions after a warm-up.")
@click.option("-d", "depths", default="0", callback=int_list, help="KV-cache depths, e.g. 0,512.")
@click.option("--synthetic", default=None, help="Benchmark a random model built in quantized form: "
              "qwen3-8b, bonsai-8b, llama-3.1-8b, qwen3-4b, qwen3-1.7b, qwen3-30b-a3b, "
              "gpt-oss-20b, qwen3.5-35b-a3b, gemma4-26b-a4b.")
@click.option("--bits", default=4, show_default=True, help="Bits for --synthetic.")
@click.option("--group-size", default=64, show_default=True, help="Group size for --synthetic.")
@click.option("--layers", default=None, type=int,
              help="Run only the first N layers of --synthetic (where memory is short; labelled).")
@click.option("--json", "fmt", flag_value="json", help="Print JSON.")
@click.option("--csv", "fmt", flag_value="csv", help="Print CSV.")
@click.option("--markdown", "fmt", flag_value="markdown", help="Print a Markdown table.")
@click.option("--plot", "plot_dir", default=None, type=click.Path(), help="Write PNG charts here.")
def bench(model, n_prompt, n_gen, reps, depths, synthetic, bits, group_size, layers, fmt,
          plot_dir):
    """Benchmark MODEL llama-bench style: pp/tg tok/s, memory, and the bandwidth ceiling."""
    from rich.console import Console

    from . import bench as b

    if synthetic and model:
        raise EdgertError("give either MODEL or --synthetic, not both")
    console = Console(stderr=True)
    report = b.run_bench(model, synthetic=synthetic, bits=bits, group_size=group_size,
                         n_prompt=n_prompt, n_gen=n_gen, reps=reps, depths=depths, layers=layers,
                         on_result=lambda r: console.print(
                             f"[dim]{r.test} @ depth {r.depth}: {r.mean:.2f} tok/s[/dim]"))
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif fmt == "csv":
        click.echo(b.to_csv(report), nl=False)
    elif fmt == "markdown":
        click.echo(b.to_markdown(report), nl=False)
    else:
        b.print_report(report)
    if plot_dir:
        for f in b.plot(report, plot_dir):
            console.print(f"wrote {f}")
    if not report.complete:
        raise EdgertError(f"benchmark stopped early: {report.stopped_by}")


def main(argv=None):
    """Entry point: one-line errors and a non-zero exit instead of tracebacks; SIGINT, SIGTERM
    and SIGHUP stop any command the same way (edgert.signals), exiting 128 + the signal."""
    from . import signals

    signals.install()
    try:
        cli.main(args=argv, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click wraps Ctrl-C in Abort
        signum = getattr(e.__cause__ or e, "signum", None) or signals.pending() or 2
        name = signals.signal.Signals(signum).name
        click.echo("interrupted" if signum == 2 else f"terminated ({name})", err=True)
        sys.exit(128 + signum)
    except click.ClickException as e:  # usage errors too: one line, with where to look
        hint = ""
        if isinstance(e, click.UsageError) and e.ctx is not None:
            hint = f" (see {e.ctx.command_path} --help)"
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except EdgertError as e:
        if Context.debug:
            raise
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a full disk, a read-only folder: name the file
        if Context.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        click.secho(f"error: {where}{e.strerror or e}", fg="red", err=True)
        sys.exit(1)
    except MemoryError:
        if Context.debug:
            raise
        click.secho("error: out of memory", fg="red", err=True)
        sys.exit(1)
    except Exception as e:  # an unexpected failure: still one line without --debug
        if Context.debug:
            raise
        click.secho(f"error: {type(e).__name__}: {e} (run with --debug for details)",
                    fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
