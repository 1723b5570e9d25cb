"""An independent NumPy Llama forward pass, written from the architecture's definition (not from core.llama).

Llama (Touvron et al. 2023; Llama 3 / SmolLM2 are the same block): x = embed[tokens]; per layer
    h = rmsnorm(x) * g_attn;  q, k, v = h Wq^T, h Wk^T, h Wv^T  (per head; kv heads shared by groups of q heads)
    q, k rotated by RoPE at their positions;  a = softmax(q k^T / sqrt(hd) + causal mask) v
    x = x + a Wo^T;  h = rmsnorm(x) * g_mlp;  x = x + (silu(h Wg^T) * (h Wu^T)) Wd^T
logits = (rmsnorm(x) * g_final) Wout^T, Wout = embed when tied. Weights are [out, in] as both HF and GGUF
store them (numpy order).

RoPE comes in the two layouts the files use: "half" (Hugging Face: dimension i pairs with i + hd/2) and
"interleaved" (llama.cpp / GGUF and the original Meta code: dimension 2j pairs with 2j + 1). Pair j turns
by angle pos * theta^(-2j/hd). Float64 throughout.
"""
from __future__ import annotations

import numpy as np


def _rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def _rope(x_thd: np.ndarray, theta: float, layout: str) -> np.ndarray:
    t, _, hd = x_thd.shape
    angle_tj = np.arange(t)[:, None] * theta ** (-2.0 * np.arange(hd // 2) / hd)[None, :]
    cos, sin = np.cos(angle_tj)[:, None, :], np.sin(angle_tj)[:, None, :]
    if layout == "half":
        a, b = x_thd[..., : hd // 2], x_thd[..., hd // 2:]
    elif layout == "interleaved":
        a, b = x_thd[..., 0::2], x_thd[..., 1::2]
    else:
        raise ValueError(layout)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x_thd)
    if layout == "half":
        out[..., : hd // 2], out[..., hd // 2:] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out


def llama_logits(w: dict[str, np.ndarray], tokens: list[int], *, n_layers: int, n_heads: int, n_kv_heads: int,
                 theta: float, eps: float, rope_layout: str) -> np.ndarray:
    """Logits [T, V] of one sequence. `w` uses GGUF names: token_embd, output_norm, output (absent when tied),
    blk.{i}.attn_norm / attn_q / attn_k / attn_v / attn_output / ffn_norm / ffn_gate / ffn_up / ffn_down."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    x = w["token_embd.weight"][tokens]
    t = len(tokens)
    mask = np.triu(np.full((t, t), -np.inf), k=1)
    for i in range(n_layers):
        p = f"blk.{i}."
        h = _rms_norm(x, w[p + "attn_norm.weight"], eps)
        q = (h @ w[p + "attn_q.weight"].T).reshape(t, n_heads, -1)
        k = (h @ w[p + "attn_k.weight"].T).reshape(t, n_kv_heads, -1)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, n_kv_heads, -1)
        hd = q.shape[-1]
        q, k = _rope(q, theta, rope_layout), _rope(k, theta, rope_layout)
        heads = []
        for head in range(n_heads):
            kv = head // (n_heads // n_kv_heads)
            scores = q[:, head] @ k[:, kv].T / np.sqrt(hd) + mask
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            heads.append(probs @ v[:, kv])
        x = x + np.concatenate(heads, axis=-1) @ w[p + "attn_output.weight"].T
        h = _rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return _rms_norm(x, w["output_norm.weight"], eps) @ head.T
