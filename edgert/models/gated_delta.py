"""Gated DeltaNet (Qwen3.5 / Qwen3-Next linear attention): the recurrence in three forms.

Per value head, with a state S of shape (Dv, Dk), decay g_t in (0, 1] and rate b_t in (0, 1):

    S <- g_t * S;   S <- S + b_t * (v_t - S k_t) k_t^T;   o_t = S q_t

- `recurrent`: the definition, one token at a time (the reference twin).
- `chunked`: the same in chunks of C tokens (the WY form: a unit-triangular solve per chunk,
  done for every chunk at once, then one state update per chunk); for prefill.
- `mx.fast.gated_delta_update`: MLX's fused kernel, used where the device runs it (probed once).

`gated_delta` dispatches between them. Shapes everywhere: q, k (B, T, Hk, Dk); v (B, T, Hv, Dv);
g, beta (B, T, Hv); state (B, Hv, Dv, Dk) float32. Value head h reads key head h // (Hv // Hk).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

CHUNK = 64


def l2_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    """x / sqrt(sum(x^2) + eps) over the last axis (the FLA / transformers l2norm)."""
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def decay_and_rate(a: mx.array, b: mx.array, A_log: mx.array, dt_bias: mx.array):
    """(g, beta) from the projections a, b (B, T, Hv): g = exp(-exp(A_log) * softplus(a + dt_bias)),
    beta = sigmoid(b), in float32."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    log_g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias.astype(mx.float32))
    return mx.exp(log_g), mx.sigmoid(b)


def _repeat_heads(x: mx.array, hv: int) -> mx.array:
    """(B, T, Hk, D) -> (B, T, Hv, D): each key head serves Hv // Hk consecutive value heads."""
    n = hv // x.shape[2]
    return x if n == 1 else mx.repeat(x, n, axis=2)


def recurrent(q, k, v, g, beta, state=None):
    """The recurrence token by token. Returns (out (B, T, Hv, Dv), state (B, Hv, Dv, Dk))."""
    B, T, _, Dk = k.shape
    Hv, Dv = v.shape[2:]
    q, k = _repeat_heads(q, Hv).astype(mx.float32), _repeat_heads(k, Hv).astype(mx.float32)
    v = v.astype(mx.float32)
    S = mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state
    outs = []
    for t in range(T):
        S = S * g[:, t, :, None, None]
        kv = (S * k[:, t, :, None, :]).sum(-1)  # (B, Hv, Dv)
        delta = (v[:, t] - kv) * beta[:, t, :, None]
        S = S + delta[..., None] * k[:, t, :, None, :]
        outs.append((S * q[:, t, :, None, :]).sum(-1))
    return mx.stack(outs, axis=1), S


def _unit_lower_inverse(m: mx.array) -> mx.array:
    """(I + m)^-1 for strictly lower-triangular m (..., C, C), by forward substitution."""
    C = m.shape[-1]
    eye = mx.eye(C, dtype=m.dtype)
    rows = [mx.broadcast_to(eye[0], m.shape[:-1])]  # row i: (..., C)
    for i in range(1, C):
        prev = mx.stack(rows, axis=-2)  # (..., i, C)
        rows.append(eye[i] - (m[..., i : i + 1, :i] @ prev)[..., 0, :])
    return mx.stack(rows, axis=-2)


def chunked(q, k, v, g, beta, state=None, chunk: int = CHUNK):
    """The recurrence in chunks of `chunk` tokens; equal to `recurrent` up to rounding.

    Within a chunk, with cumulative decays G_t = g_1...g_t and S0 the state before it, the
    per-token updates u_t = b_t (v_t - G_t S0 k_t - sum_{s<t} (G_t/G_s)(k_t.k_s) u_s) solve a
    unit lower-triangular system; then o_t = G_t S0 q_t + sum_{s<=t} (G_t/G_s)(q_t.k_s) u_s and
    the state after it is G_C S0 + sum_s (G_C/G_s) u_s k_s^T."""
    B, T, _, Dk = k.shape
    Hv, Dv = v.shape[2:]
    C = min(chunk, T)
    pad = (-T) % C
    n = (T + pad) // C

    def prep(x, width=None):  # (B, T, Hv[, D]) -> (B, Hv, n, C[, D]) float32, zero-padded
        x = x.astype(mx.float32)
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        x = mx.pad(x, widths) if pad else x
        x = x.reshape(B, n, C, *x.shape[2:])
        return x.transpose(0, 3, 1, 2, 4) if x.ndim == 5 else x.transpose(0, 3, 1, 2)

    q, k, v = prep(_repeat_heads(q, Hv)), prep(_repeat_heads(k, Hv)), prep(v)
    log_g = prep(mx.log(mx.maximum(g.astype(mx.float32), 1e-38)))  # (B, Hv, n, C); pads: 0
    beta = prep(beta)  # padded positions: 0, no update
    G = mx.cumsum(log_g, axis=-1)  # (B, Hv, n, C) log of the cumulative decay
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)
    diff = G[..., :, None] - G[..., None, :]  # (B, Hv, n, C, C): log(G_t / G_s)
    ratio = mx.exp(mx.where(causal, diff, -mx.inf))  # 0 above the diagonal

    kk = k @ k.swapaxes(-1, -2)  # (B, Hv, n, C, C)
    m = mx.where(strict, beta[..., :, None] * ratio * kk, 0.0)
    t_inv = _unit_lower_inverse(m)  # (B, Hv, n, C, C)
    w_v = t_inv @ (beta[..., None] * v)  # (B, Hv, n, C, Dv)
    w_k = t_inv @ ((beta * mx.exp(G))[..., None] * k)  # (B, Hv, n, C, Dk)
    qk = ratio * (q @ k.swapaxes(-1, -2))  # (B, Hv, n, C, C) incl. the diagonal
    q_g = mx.exp(G)[..., None] * q  # (B, Hv, n, C, Dk)
    k_tail = mx.exp(G[..., -1:] - G)[..., None] * k  # (B, Hv, n, C, Dk): (G_C / G_s) k_s

    S = mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
    outs = []
    for i in range(n):
        u = w_v[:, :, i] - w_k[:, :, i] @ S.swapaxes(-1, -2)  # (B, Hv, C, Dv)
        outs.append(q_g[:, :, i] @ S.swapaxes(-1, -2) + qk[:, :, i] @ u)  # (B, Hv, C, Dv)
        S = mx.exp(G[:, :, i, -1])[..., None, None] * S + u.swapaxes(-1, -2) @ k_tail[:, :, i]
    out = mx.concatenate(outs, axis=2)[:, :, :T]  # (B, Hv, T, Dv)
    return out.transpose(0, 2, 1, 3), S


@functools.cache
def fused_available() -> bool:
    """Whether mx.fast.gated_delta_update runs on the default device (tried once, on a tiny
    input, against the reference twin)."""
    fn = getattr(mx.fast, "gated_delta_update", None)
    if fn is None:
        return False
    try:
        key = mx.random.key(0)
        q, k = (l2_normalize(mx.random.normal((1, 3, 1, 32), key=s)) for s in mx.random.split(key))
        v = mx.random.normal((1, 3, 2, 8), key=key)
        g, beta = mx.full((1, 3, 2), 0.9), mx.full((1, 3, 2), 0.5)
        out, state = fn(q, k, v, g, beta, mx.zeros((1, 2, 8, 32)))
        ref, ref_state = recurrent(q, k, v, g, beta)
        return bool(mx.allclose(out, ref, atol=1e-4).item()
                    and mx.allclose(state, ref_state, atol=1e-4).item())
    except Exception:  # noqa: BLE001 - any failure means: not on this device
        return False


def gated_delta(q, k, v, g, beta, state=None, *, use_fused: bool | None = None):
    """The recurrence over T new tokens from `state`: MLX's fused kernel where it runs, else
    the chunked form for prefill and the token-by-token one for short inputs.
    Returns (out (B, T, Hv, Dv) float32, state (B, Hv, Dv, Dk) float32)."""
    B, T, _, Dk = k.shape
    Hv, Dv = v.shape[2:]
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
    if use_fused is None:
        use_fused = fused_available()
    if use_fused:
        out, state = mx.fast.gated_delta_update(q.astype(mx.float32), k.astype(mx.float32),
                                                v.astype(mx.float32), g, beta, state)
        return out, state
    if T <= 8:
        return recurrent(q, k, v, g, beta, state)
    return chunked(q, k, v, g, beta, state)
