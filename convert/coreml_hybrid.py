"""Core ML graph of the hybrid family (COREML_GRAPH "hybrid": Qwen3.5 / Qwen3.6): Gated
DeltaNet linear-attention layers beside gated full-attention layers, as the MLX model
edgert.models.qwen3_5 computes them.

States (fp16, shared by prefill and decode, each read once and threaded through the layers as
in the llama graph):

    key_cache, value_cache  (n_full, n_kv_heads, context, head_dim)   kv_cache, full layers only
    conv_state              (n_linear, K - 1, conv_dim)                recurrent: the last K-1
                            inputs of each linear layer's causal depthwise conv1d
    delta_state             (n_linear, Hv, Dv, Dk)                     recurrent: the delta rule's S

A linear layer's recurrence runs in float32 (the states are stored fp16):
    S <- g_t S;  S <- S + b_t (v_t - S k_t) k_t^T;  o_t = S q_t
`decode` does one step; `prefill` runs the steps in a MIL `while_loop` over the chunk's L
tokens (projections, conv and gates computed for all L at once before it). The conv runs as
K shifted slices of [state, x] whose ends count from the back, so no shape is computed.

What is architecture-specific comes from the model module: its ModelArgs (layer_types,
linear_* sizes, partial_rotary_factor) and ZERO_CENTRED_NORMS (norm weights used as 1 + w).
"""

from __future__ import annotations

import numpy as np

from edgert.coreml_manifest import STATES
from edgert.errors import UnsupportedError

from .coreml_writer import Arch, StateSpec, _Graph, _op_name

LINEAR = "linear_attention"
RECURRENT_STATES = ("conv_state", "delta_state")


def _layout(arch: Arch) -> tuple[list[int], list[int]]:
    """(full-attention layer indices, linear layer indices)."""
    types = list(arch.args.layer_types)
    return ([i for i, t in enumerate(types) if t != LINEAR],
            [i for i, t in enumerate(types) if t == LINEAR])


class HybridGraph(_Graph):
    """Gated DeltaNet + gated attention (see the module docstring)."""

    @staticmethod
    def states(arch: Arch, context: int) -> list[StateSpec]:
        a = arch.args
        full, linear = _layout(arch)
        K = a.linear_conv_kernel_dim
        if linear and K < 2:
            raise UnsupportedError("Core ML export: a conv1d kernel of 1 (no conv state)")
        conv_dim = 2 * a.linear_num_key_heads * a.linear_key_head_dim + (
            a.linear_num_value_heads * a.linear_value_head_dim)
        out = []
        if full:
            kv = (len(full), arch.n_kv_heads, context, arch.head_dim)
            out += [StateSpec(STATES[0], kv, "kv_cache"), StateSpec(STATES[1], kv, "kv_cache")]
        if linear:
            out += [StateSpec(RECURRENT_STATES[0], (len(linear), K - 1, conv_dim), "recurrent"),
                    StateSpec(RECURRENT_STATES[1], (len(linear), a.linear_num_value_heads,
                                                    a.linear_value_head_dim,
                                                    a.linear_key_head_dim), "recurrent")]
        return out

    def w(self, name: str):
        """As _Graph.w, but a zero-centred norm's weight is emitted as 1 + w (fp16)."""
        if name not in self._vars and name.endswith(self.arch.module.ZERO_CENTRED_NORMS):
            val = self.weights[name].arrays["val"].astype(np.float32) + 1.0
            self._vars[name] = self.mb.const(val=val.astype(np.float16), name=_op_name(name))
        return super().w(name)

    def build(self, input_ids, position, mask, states: dict, decode: bool):
        mb = self.mb
        full, linear = _layout(self.arch)
        x, cos, sin, end = self.embed(input_ids, position, decode)
        mask = self.gqa_mask(mask)
        self.read(states)
        for i in range(self.arch.n_layers):
            p = f"model.layers.{i}"
            h = self.rms_norm(x, f"{p}.input_layernorm.weight")
            if i in linear:
                o = self.delta_net(h, f"{p}.linear_attn", linear.index(i), decode)
            else:
                o = self.gated_attention(h, f"{p}.self_attn", full.index(i), cos, sin,
                                         position, end, mask)
            x = self.mlp(mb.add(x=x, y=o), p)
        return self.head(x, decode)

    # ------------------------------------------------------------------ full attention

    def gated_attention(self, h, p: str, slot: int, cos, sin, position, end, mask):
        """q_proj gives per head [query (D), gate (D)]; q/k norm; partial rotary; the output
        times sigmoid(gate) goes through o_proj."""
        mb, a = self.mb, self.arch
        H, KV, D = a.n_heads, a.n_kv_heads, a.head_dim
        qg = mb.reshape(x=self.linear(h, f"{p}.q_proj"), shape=[1, -1, H, 2 * D])
        q, gate = mb.split(x=qg, num_splits=2, axis=-1)  # (1, L, H, D) each
        k = mb.reshape(x=self.linear(h, f"{p}.k_proj"), shape=[1, -1, KV, D])
        v = mb.reshape(x=self.linear(h, f"{p}.v_proj"), shape=[1, -1, KV, D])
        q = self.rms_norm(q, f"{p}.q_norm.weight")
        k = self.rms_norm(k, f"{p}.k_norm.weight")
        q = self.rope(mb.transpose(x=q, perm=[0, 2, 1, 3]), cos, sin)  # (1, H, L, D)
        k = self.rope(mb.transpose(x=k, perm=[0, 2, 1, 3]), cos, sin)  # (1, KV, L, D)
        v = mb.transpose(x=v, perm=[0, 2, 1, 3])
        o = self.attend(q, k, v, slot, position, end, mask)  # (1, L, H * D)
        o = mb.mul(x=o, y=mb.sigmoid(x=mb.reshape(x=gate, shape=[1, -1, H * D])))
        return self.linear(o, f"{p}.o_proj")

    # ------------------------------------------------------------------ Gated DeltaNet

    def conv(self, qkv, p: str, slot: int):
        """Causal depthwise conv1d over [conv state, qkv] (1, K-1+L, C) -> SiLU'd (1, L, C);
        the last K-1 inputs become the slot's conv state."""
        mb = self.mb
        _, n_conv, C = self._values[RECURRENT_STATES[0]].shape
        K = n_conv + 1
        state = mb.slice_by_index(x=self._values[RECURRENT_STATES[0]], begin=[slot, 0, 0],
                                  end=[slot + 1, n_conv, C])  # (1, K-1, C)
        padded = mb.concat(values=[state, qkv], axis=1)  # (1, K-1+L, C)
        self.update(RECURRENT_STATES[0],
                    mb.slice_by_index(x=padded, begin=[0, -n_conv, 0], end=[1, 0, C],
                                      end_mask=[False, True, False]),
                    np.array([slot, 0, 0], np.int32), np.array([slot + 1, n_conv, C], np.int32))
        w = mb.transpose(x=mb.reshape(x=self.w(f"{p}.conv1d.weight"), shape=[C, K]),
                         perm=[1, 0])  # (K, C)
        out = None
        for j in range(K):  # padded[:, j : j + L], its end counted from the back
            tap = mb.slice_by_index(x=padded, begin=[0, j, 0], end=[1, j - n_conv, C],
                                    end_mask=[False, j == n_conv, False])
            term = mb.mul(x=tap, y=mb.slice_by_index(x=w, begin=[j, 0], end=[j + 1, C]))
            out = term if out is None else mb.add(x=out, y=term)
        return mb.silu(x=out)

    def delta_net(self, h, p: str, slot: int, decode: bool):
        mb, a = self.mb, self.arch.args
        Hk, Hv = a.linear_num_key_heads, a.linear_num_value_heads
        Dk, Dv = a.linear_key_head_dim, a.linear_value_head_dim
        key_dim = Hk * Dk
        conv = self.conv(self.linear(h, f"{p}.in_proj_qkv"), p, slot)  # (1, L, C)
        conv = mb.cast(x=conv, dtype="fp32")
        q, k, v = mb.split(x=conv, split_sizes=[key_dim, key_dim, Hv * Dv], axis=-1)
        q = mb.mul(x=self._heads(self._l2_normalize(q, Hk, Dk), Hv), y=np.float32(Dk**-0.5))
        k = self._heads(self._l2_normalize(k, Hk, Dk), Hv)  # (1, L, Hv, Dk)
        v = mb.reshape(x=v, shape=[1, -1, Hv, Dv])
        a_ = mb.cast(x=self.linear(h, f"{p}.in_proj_a"), dtype="fp32")  # (1, L, Hv)
        b_ = mb.cast(x=self.linear(h, f"{p}.in_proj_b"), dtype="fp32")
        dt_bias = mb.cast(x=self.w(f"{p}.dt_bias"), dtype="fp32")
        A = mb.exp(x=mb.cast(x=self.w(f"{p}.A_log"), dtype="fp32"))
        g = mb.exp(x=mb.mul(x=mb.mul(x=A, y=np.float32(-1.0)),
                            y=mb.softplus(x=mb.add(x=a_, y=dt_bias))))  # (1, L, Hv)
        beta = mb.sigmoid(x=b_)

        S_all = self._values[RECURRENT_STATES[1]]
        S = mb.cast(x=mb.slice_by_index(x=S_all, begin=[slot, 0, 0, 0],
                                        end=[slot + 1, Hv, Dv, Dk]), dtype="fp32")
        if decode:
            o, S = self._step(S, *(mb.reshape(x=t, shape=shape) for t, shape in
                                   [(q, [1, Hv, Dk, 1]), (k, [1, Hv, Dk, 1]), (v, [1, Hv, Dv, 1]),
                                    (g, [1, Hv, 1, 1]), (beta, [1, Hv, 1, 1])]))
            o = mb.reshape(x=o, shape=[1, 1, Hv, Dv])
        else:
            o, S = self._scan(S, q, k, v, g, beta)
        self.update(RECURRENT_STATES[1], mb.cast(x=S, dtype="fp16"),
                    np.array([slot, 0, 0, 0], np.int32),
                    np.array([slot + 1, Hv, Dv, Dk], np.int32))
        o = mb.cast(x=o, dtype="fp16")  # (1, L, Hv, Dv)
        z = mb.reshape(x=self.linear(h, f"{p}.in_proj_z"), shape=[1, -1, Hv, Dv])
        o = mb.mul(x=self.rms_norm(o, f"{p}.norm.weight"), y=mb.silu(x=z))
        return self.linear(mb.reshape(x=o, shape=[1, -1, Hv * Dv]), f"{p}.out_proj")

    def _l2_normalize(self, x, heads: int, dims: int):
        """(1, L, heads * dims) fp32 -> (1, L, heads, dims), x / sqrt(sum(x^2) + 1e-6)."""
        mb = self.mb
        x = mb.reshape(x=x, shape=[1, -1, heads, dims])
        ss = mb.reduce_sum(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
        return mb.mul(x=x, y=mb.rsqrt(x=ss, epsilon=np.float32(1e-6)))

    def _heads(self, x, hv: int):
        """(1, L, Hk, D) -> (1, L, Hv, D): key head j serves value heads j*r ... j*r + r-1."""
        mb = self.mb
        _, _, hk, d = x.shape
        if hv == hk:
            return x
        x = mb.tile(x=mb.expand_dims(x=x, axes=[3]), reps=[1, 1, 1, hv // hk, 1])
        return mb.reshape(x=x, shape=[1, -1, hv, d])

    def _step(self, S, q, k, v, g, beta):
        """One token: S (1, Hv, Dv, Dk); q, k (1, Hv, Dk, 1); v (1, Hv, Dv, 1); g, beta
        (1, Hv, 1, 1) -> (o (1, Hv, Dv, 1), new S)."""
        mb = self.mb
        S = mb.mul(x=S, y=g)
        delta = mb.mul(x=mb.sub(x=v, y=mb.matmul(x=S, y=k)), y=beta)  # (1, Hv, Dv, 1)
        S = mb.add(x=S, y=mb.matmul(x=delta, y=k, transpose_y=True))
        return mb.matmul(x=S, y=q), S

    def _scan(self, S, q, k, v, g, beta):
        """The steps over all L tokens in a while_loop -> (o (1, L, Hv, Dv), final S)."""
        mb = self.mb
        Hv, Dv, Dk = S.shape[1:]
        # token-major copies, gathered by the step index: (L, Hv, ...)
        qs, ks, vs = (mb.squeeze(x=t, axes=[0]) for t in (q, k, v))
        gs, bs = mb.squeeze(x=g, axes=[0]), mb.squeeze(x=beta, axes=[0])  # (L, Hv)
        n = mb.gather(x=mb.shape(x=qs), indices=0, axis=0)  # scalar L
        outs = mb.fill(shape=mb.concat(values=[mb.expand_dims(x=n, axes=[0]),
                                               np.array([Hv, Dv], np.int32)], axis=0),
                       value=np.float32(0.0))  # (L, Hv, Dv)

        def cond(t, S, outs):
            return mb.less(x=t, y=n)

        def body(t, S, outs):
            def at(x, shape):
                return mb.reshape(x=mb.gather(x=x, indices=t, axis=0), shape=shape)

            o, S = self._step(S, at(qs, [1, Hv, Dk, 1]), at(ks, [1, Hv, Dk, 1]),
                              at(vs, [1, Hv, Dv, 1]), at(gs, [1, Hv, 1, 1]),
                              at(bs, [1, Hv, 1, 1]))
            t1 = mb.expand_dims(x=t, axes=[0])
            outs = mb.slice_update(
                x=outs, update=mb.reshape(x=o, shape=[1, Hv, Dv]),
                begin=mb.concat(values=[t1, np.array([0, 0], np.int32)], axis=0),
                end=mb.concat(values=[mb.add(x=t1, y=np.int32(1)),
                                      np.array([Hv, Dv], np.int32)], axis=0))
            return mb.add(x=t, y=np.int32(1)), S, outs

        _, S, outs = mb.while_loop(_cond=cond, _body=body,
                                   loop_vars=(np.int32(0), S, outs))
        return mb.expand_dims(x=outs, axes=[0]), S  # (1, L, Hv, Dv)

