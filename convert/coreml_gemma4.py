"""Core ML graph of Gemma 4's dense text models (COREML_GRAPH "gemma4"), as the MLX model
edgert.models.gemma4 computes them: sliding-window and full-attention layers with their own
head sizes and rope, KV-shared layers, per-layer embeddings (PLE), `layer_scalar`, logit
soft-capping. Mixture-of-experts variants are refused by the writer.

States (fp16, shared by both functions, each read once and threaded through the layers):

    key_cache, value_cache                  (n_full, KV_full, context, D_full)   kv_cache
    sliding_key_cache, sliding_value_cache  (n_sliding, KV, S, D)                window

for the layers that compute keys and values (the KV-shared layers at the end have none: each
attends over the keys and values of the last earlier layer of its type, as computed in the same
call). S = min(sliding_window, context). A window slot holds the S positions before `position`
in order, oldest first; a call attends over [slot, new keys] (S + L) and keeps the last S of
them, so the state never depends on a position modulo anything and has no wrap-around. Its
mask is made in the program from `position`: key p is visible to query q iff
0 <= p <= q and q - p < sliding_window. Full layers write at [position, position + L) and use
the `causal_mask` input, as the llama graph does.

Per-layer embeddings: the (vocab, layers * ple) table is looked up outside the program (the
manifest's input `per_layer_embeddings`, source `embedding_rows` of the package's PLE file);
the program gets the rows of the chunk's tokens, (1, L, layers * ple) fp16, and does the rest
(the projection of the embeddings, its norm, the sum and scales).

Numerics (see bench/RESULTS.md, "Gemma in fp16"): Gemma's residual stream outgrows fp16 (the
real Gemma 3 270M reaches 1.0e5 by its 9th layer), while everything inside the branches stays
far below 65504. So the residual stream is float32: the embedding scale, every residual add,
the norms that read it (input, pre-feedforward, final: fp32 in, fp16 out) or write to it (the
post-norms: fp16 in, fp32 out), `layer_scalar`, and the soft-capped logits. The PLE gate is the
one matmul that reads the raw residual: it runs in fp16 on x / max|x| (per token) and is scaled
back by max|x| in fp32 (`scaled_linear`), as is the PLE projection whose input it feeds.
Attention has scale 1.0: sqrt(D) is folded into the q-norm weight, since Core ML's fused
attention divides by sqrt(D).
"""

from __future__ import annotations

import numpy as np

from edgert.coreml_manifest import STATES
from edgert.errors import UnsupportedError

from .coreml_writer import MASK_VALUE, Arch, InputSpec, StateSpec, _Graph, _h, _op_name

SLIDING_STATES = ("sliding_key_cache", "sliding_value_cache")
PLE_INPUT = "per_layer_embeddings"
FULL = "full_attention"


def _f(x: float) -> np.float32:
    return np.float32(x)


def _layout(arch: Arch) -> tuple[list[int], list[int]]:
    """(full-attention layers, sliding layers) among those that hold a cache."""
    a = arch.args
    cached = range(a.first_kv_shared)
    return ([i for i in cached if a.layer_types[i] == FULL],
            [i for i in cached if a.layer_types[i] != FULL])


def _dims(arch: Arch, layers: list[int]) -> tuple[int, int]:
    """(head_dim, kv heads) shared by `layers` (one state holds them all)."""
    dims = {arch.args.layer_dims(i) for i in layers}
    if len(dims) > 1:
        raise UnsupportedError(f"Core ML export: layers of one attention type with different "
                               f"head sizes {sorted(dims)}")
    return dims.pop()


class Gemma4Graph(_Graph):
    """Gemma 4 dense (see the module docstring)."""

    @staticmethod
    def inv_freq(a) -> np.ndarray:
        return np.zeros(0)  # each attention type has its own tables (rope_tables below)

    @staticmethod
    def states(arch: Arch, context: int) -> list[StateSpec]:
        a = arch.args
        full, sliding = _layout(arch)
        out = []
        if full:
            D, KV = _dims(arch, full)
            shape = (len(full), KV, context, D)
            out += [StateSpec(STATES[0], shape, "kv_cache"), StateSpec(STATES[1], shape, "kv_cache")]
        if sliding:
            D, KV = _dims(arch, sliding)
            shape = (len(sliding), KV, min(a.sliding_window, context), D)
            out += [StateSpec(n, shape, "window") for n in SLIDING_STATES]
        return out

    @staticmethod
    def extra_inputs(arch: Arch) -> list[InputSpec]:
        a = arch.args
        ple = a.hidden_size_per_layer_input
        if not ple:
            return []
        from edgert.models.gemma4 import PLE, PLE_FILE

        # the writer adds the file's layout (shape, quantization, bytes) to the source
        return [InputSpec(PLE_INPUT, (a.num_hidden_layers * ple,),
                          {"kind": "embedding_rows", "path": PLE_FILE, "tensor": PLE,
                           "ids": "input_ids"})]

    # ------------------------------------------------------------------ weights

    def w(self, name: str):
        """As _Graph.w; a q-norm weight is emitted times sqrt(head_dim) (attention scale 1)."""
        if name not in self._vars and name.endswith("self_attn.q_norm.weight"):
            val = self.weights[name].arrays["val"].astype(np.float32)
            val = val * np.float32(np.sqrt(val.shape[-1]))
            self._vars[name] = self.mb.const(val=val.astype(np.float16), name=_op_name(name))
        return super().w(name)

    def w32(self, name: str):
        """A (small) weight as fp32."""
        return self.mb.cast(x=self.w(name), dtype="fp32")

    # ------------------------------------------------------------------ numerics

    def norm32(self, x, weight_name: str | None, out: str):
        """RMSNorm of fp32 `x` in fp32, the result cast to `out` ("fp16" / "fp32")."""
        mb = self.mb
        ms = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
        y = mb.mul(x=x, y=mb.rsqrt(x=mb.add(x=ms, y=_f(self.arch.eps)), epsilon=_f(0.0)))
        if weight_name is not None:
            y = mb.mul(x=y, y=self.w32(weight_name))
        return y if out == "fp32" else mb.cast(x=y, dtype=out)

    def post_norm(self, x16, weight_name: str):
        """A post-norm: fp16 branch output -> its RMSNorm in fp32 (added to the residual)."""
        return self.norm32(self.mb.cast(x=x16, dtype="fp32"), weight_name, "fp32")

    def scaled_linear(self, x32, prefix: str):
        """linear(x) of an fp32 x of any magnitude, through an fp16 matmul:
        m = max(max|x|, 2^-14) per token; linear(fp16(x / m)) * m in fp32."""
        mb = self.mb
        m = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x32), axes=[-1], keep_dims=True),
                       y=_f(2.0**-14))
        y = self.linear(mb.cast(x=mb.real_div(x=x32, y=m), dtype="fp16"), prefix)
        return mb.mul(x=mb.cast(x=y, dtype="fp32"), y=m)

    # ------------------------------------------------------------------ the graph

    def rope_rows(self, layer_type: str, pos):
        """cos, signed sin (L, D) of `layer_type`'s rope at positions `pos`."""
        from edgert.models.gemma4 import rope_wavelengths

        a = self.arch.args
        D = a.layer_dims(a.layer_types.index(layer_type))[0]
        with np.errstate(divide="ignore"):
            inv = 1.0 / rope_wavelengths(D, a.rope_parameters[layer_type]).astype(np.float64)
        angles = np.arange(self.context, dtype=np.float64)[:, None] * inv[None, :]
        cos = np.concatenate([np.cos(angles)] * 2, axis=1).astype(np.float16)
        sin = np.concatenate([-np.sin(angles), np.sin(angles)], axis=1).astype(np.float16)
        return (self.mb.gather(x=cos, indices=pos, axis=0),
                self.mb.gather(x=sin, indices=pos, axis=0))

    def rotate(self, x, cos, sin):
        """Rotate-half rope over the whole head: x (1, heads, L, D); cos, sin (L, D)."""
        mb = self.mb
        x1, x2 = mb.split(x=x, num_splits=2, axis=-1)
        return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=mb.concat(values=[x2, x1], axis=-1),
                                                       y=sin))

    def sliding_mask(self, position, n, S: int, decode: bool):
        """(1, 1, L, S + L) fp16 additive mask of a sliding layer: keys are the S slots before
        `position` then the L new ones; query i sees key p iff 0 <= p <= i, i - p < window
        (positions relative to `position`, p >= -position)."""
        mb, W = self.mb, self.arch.args.sliding_window
        new = np.zeros(1, np.int32) if decode else mb.range_1d(start=0, end=n, step=1)  # (L,)
        rel_k = mb.concat(values=[np.arange(-S, 0, dtype=np.int32), new], axis=0)  # (S + L,)
        rel_q = mb.expand_dims(x=new, axes=[1])  # (L, 1)
        visible = mb.logical_and(
            x=mb.logical_and(x=mb.less_equal(x=rel_k, y=rel_q),
                             y=mb.greater(x=rel_k, y=mb.sub(x=rel_q, y=np.int32(W)))),
            y=mb.greater_equal(x=mb.add(x=rel_k, y=position), y=np.int32(0)))
        # (L, S + L): visible 0, else MASK_VALUE (arithmetic: select's folding of a constant
        # decode mask fails in coremltools)
        mask = mb.mul(x=mb.sub(x=mb.cast(x=visible, dtype="fp16"), y=_h(1.0)),
                      y=_h(-MASK_VALUE))
        return mb.expand_dims(x=mask, axes=[0, 1])

    def build(self, input_ids, position, mask, states: dict, decode: bool):
        mb, arch, a = self.mb, self.arch, self.arch.args
        full, sliding = _layout(arch)
        n = mb.gather(x=mb.shape(x=input_ids), indices=1, axis=0)  # scalar L
        pos = position if decode else mb.add(x=mb.range_1d(start=0, end=n, step=1), y=position)
        end = mb.add(x=position, y=mb.gather(x=mb.shape(x=input_ids), indices=[1], axis=0))
        ropes = {t: self.rope_rows(t, pos) for t in sorted(set(a.layer_types))}  # fixed op order
        masks = {FULL: mask}
        if sliding:
            S = self.states(arch, self.context)[-1].shape[2]
            masks["sliding_attention"] = self.sliding_mask(position, n, S, decode)
        self.read(states)

        emb = mb.gather(x=self.w("model.embed_tokens.weight"), indices=input_ids, axis=0)
        x = mb.mul(x=mb.cast(x=emb, dtype="fp32"), y=_f(a.hidden_size**0.5))  # (1, L, hid)
        ple = self.per_layer_inputs(x) if a.hidden_size_per_layer_input else None
        kvs: dict[int, tuple] = {}
        for i in range(a.num_hidden_layers):
            p = f"model.layers.{i}"
            t = a.layer_types[i]
            h = self.norm32(x, f"{p}.input_layernorm.weight", "fp16")
            o, kvs[i] = self.attention(h, i, ropes[t], masks, full, sliding, position, end,
                                       kvs.get(a.kv_source[i]) if a.kv_source[i] != i else None)
            x = mb.add(x=x, y=self.post_norm(o, f"{p}.post_attention_layernorm.weight"))
            h = self.norm32(x, f"{p}.pre_feedforward_layernorm.weight", "fp16")
            x = mb.add(x=x, y=self.post_norm(self.mlp_branch(h, p),
                                             f"{p}.post_feedforward_layernorm.weight"))
            if ple is not None:
                x = mb.add(x=x, y=self.ple_branch(x, ple, i, p))
            if self.has(f"{p}.layer_scalar"):
                x = mb.mul(x=x, y=self.w32(f"{p}.layer_scalar"))
        return self.head32(x, decode)

    def per_layer_inputs(self, x32):
        """The scaled embeddings (1, L, hid) fp32 and the looked-up rows -> (1, L, layers,
        ple) fp32: (norm(proj(x) / sqrt(hid)) + rows * sqrt(ple)) / sqrt(2)."""
        mb, a = self.mb, self.arch.args
        ple, n = a.hidden_size_per_layer_input, a.num_hidden_layers
        rows = mb.cast(x=self.inputs[PLE_INPUT], dtype="fp32")
        rows = mb.reshape(x=mb.mul(x=rows, y=_f(ple**0.5)), shape=[1, -1, n, ple])
        proj = self.scaled_linear(x32, "model.per_layer_model_projection")  # (1, L, n * ple)
        proj = mb.reshape(x=mb.mul(x=proj, y=_f(a.hidden_size**-0.5)), shape=[1, -1, n, ple])
        proj = self.norm32(proj, "model.per_layer_projection_norm.weight", "fp32")
        return mb.mul(x=mb.add(x=proj, y=rows), y=_f(2.0**-0.5))

    def ple_branch(self, x32, ple, i: int, p: str):
        """norm(proj(gelu(gate(x)) * ple[:, :, i])) in fp32, gate and proj through fp16."""
        mb, a = self.mb, self.arch.args
        d = a.hidden_size_per_layer_input
        rows = mb.slice_by_index(x=ple, begin=[0, 0, i, 0], end=[1, 0, i + 1, d],
                                 end_mask=[False, True, False, False], squeeze_mask=[
                                     False, False, True, False])  # (1, L, ple)
        g = mb.gelu(x=self.scaled_linear(x32, f"{p}.per_layer_input_gate"),
                    mode="TANH_APPROXIMATION")
        g = self.scaled_linear(mb.mul(x=g, y=rows), f"{p}.per_layer_projection")
        return self.norm32(g, f"{p}.post_per_layer_input_norm.weight", "fp32")

    def mlp_branch(self, h, p: str):
        mb = self.mb
        gate = mb.gelu(x=self.linear(h, f"{p}.mlp.gate_proj"), mode="TANH_APPROXIMATION")
        return self.linear(mb.mul(x=gate, y=self.linear(h, f"{p}.mlp.up_proj")),
                           f"{p}.mlp.down_proj")

    def attention(self, h, i: int, rope, masks: dict, full: list, sliding: list, position,
                  end, shared):
        """Layer i's attention of h (1, L, hid) fp16 -> ((1, L, hid), (keys, values)); a
        KV-shared layer attends over `shared`, its source layer's (keys, values)."""
        mb, a = self.mb, self.arch.args
        p = f"model.layers.{i}.self_attn"
        t = a.layer_types[i]
        D, KV = a.layer_dims(i)
        H = a.num_attention_heads
        q = mb.reshape(x=self.linear(h, f"{p}.q_proj"), shape=[1, -1, H, D])
        q = self.rms_norm(q, f"{p}.q_norm.weight")  # times sqrt(D): see w()
        q = self.rotate(mb.transpose(x=q, perm=[0, 2, 1, 3]), *rope)  # (1, H, L, D)
        if shared is None:
            k = mb.reshape(x=self.linear(h, f"{p}.k_proj"), shape=[1, -1, KV, D])
            v = k if not self.has(f"{p}.v_proj.weight") else mb.reshape(
                x=self.linear(h, f"{p}.v_proj"), shape=[1, -1, KV, D])
            k = self.rotate(mb.transpose(x=self.rms_norm(k, f"{p}.k_norm.weight"),
                                         perm=[0, 2, 1, 3]), *rope)  # (1, KV, L, D)
            v = mb.transpose(x=self.rms_norm(v, None), perm=[0, 2, 1, 3])
            if t == FULL:
                shared = self.write_full(k, v, full.index(i), position, end)
            else:
                shared = self.write_sliding(k, v, sliding.index(i))
        keys, values = shared
        KV = keys.shape[1]
        n_rep = H // KV
        m = masks[t] if n_rep == 1 else mb.tile(x=masks[t], reps=[1, 1, n_rep, 1])
        qg = mb.reshape(x=q, shape=[1, KV, -1, D])  # (1, KV, n_rep * L, D)
        o = mb.scaled_dot_product_attention(query=qg, key=keys, value=values, attn_mask=m)
        o = mb.transpose(x=mb.reshape(x=o, shape=[1, H, -1, D]), perm=[0, 2, 1, 3])
        return self.linear(mb.reshape(x=o, shape=[1, -1, H * D]), f"{p}.o_proj"), shared

    def write_full(self, k, v, slot: int, position, end):
        """k, v (1, KV, L, D) into full slot `slot` at [position, end) -> its whole cache."""
        mb, ctx = self.mb, self.context
        KV, D = k.shape[1], k.shape[3]
        begin = mb.concat(values=[np.array([slot, 0], np.int32), position,
                                  np.array([0], np.int32)], axis=0)
        stop = mb.concat(values=[np.array([slot + 1, KV], np.int32), end,
                                 np.array([D], np.int32)], axis=0)
        out = []
        for name, x in zip(STATES, (k, v)):
            cache = self.update(name, x, begin, stop)
            out.append(mb.slice_by_index(x=cache, begin=[slot, 0, 0, 0],
                                         end=[slot + 1, KV, ctx, D]))
        return tuple(out)

    def write_sliding(self, k, v, slot: int):
        """[window slot, k / v] (1, KV, S + L, D) to attend over; its last S become the slot."""
        mb = self.mb
        out = []
        for name, x in zip(SLIDING_STATES, (k, v)):
            _, KV, S, D = self._values[name].shape
            old = mb.slice_by_index(x=self._values[name], begin=[slot, 0, 0, 0],
                                    end=[slot + 1, KV, S, D])
            both = mb.concat(values=[old, x], axis=2)  # (1, KV, S + L, D)
            kept = mb.slice_by_index(x=both, begin=[0, 0, -S, 0], end=[1, KV, 0, D],
                                     end_mask=[False, False, True, False])
            self.update(name, kept, np.array([slot, 0, 0, 0], np.int32),
                        np.array([slot + 1, KV, S, D], np.int32))
            out.append(both)
        return tuple(out)

    def rms_norm(self, x, weight_name: str | None):
        """As _Graph.rms_norm (fp16, overflow-free); without a weight for the value norm."""
        if weight_name is not None:
            return super().rms_norm(x, weight_name)
        mb = self.mb
        m = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True),
                       y=_h(2.0**-14))
        y = mb.real_div(x=x, y=m)
        ms = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)
        r = mb.real_div(x=_h(np.sqrt(self.arch.eps)), y=m)
        return mb.mul(x=y, y=mb.rsqrt(x=mb.add(x=ms, y=mb.mul(x=r, y=r)), epsilon=_h(0.0)))

    def head32(self, x32, decode: bool):
        """Final norm (fp32 in), tied / untied head, soft-capping in fp32 -> logits."""
        mb, a = self.mb, self.arch.args
        if not decode:  # last position only
            x32 = mb.slice_by_index(x=x32, begin=[0, -1, 0], end=[1, 0, a.hidden_size],
                                    end_mask=[False, True, False])  # (1, 1, hid)
        h = self.norm32(x32, "model.norm.weight", "fp16")
        head = "lm_head" if self.has("lm_head.weight") else "model.embed_tokens"
        logits = mb.linear(x=h, weight=self.w(f"{head}.weight"))  # (1, 1, vocab)
        self.check_all_used()
        if not (cap := a.final_logit_softcapping):
            return mb.cast(x=logits, dtype="fp32", name="logits")
        logits = mb.mul(x=mb.cast(x=logits, dtype="fp32"), y=_f(1.0 / cap))
        return mb.mul(x=mb.tanh(x=logits), y=_f(cap), name="logits")
