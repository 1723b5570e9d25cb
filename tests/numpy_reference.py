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
                 theta: float, eps: float, rope_layout: str, qkv_bias: bool = False,
                 qk_norm: bool = False) -> np.ndarray:
    """Logits [T, V] of one sequence. `w` uses GGUF names: token_embd, output_norm, output (absent when tied),
    blk.{i}.attn_norm / attn_q / attn_k / attn_v / attn_output / ffn_norm / ffn_gate / ffn_up / ffn_down.

    qkv_bias (Qwen2/2.5): q, k, v = h W^T + b with blk.{i}.attn_{q,k,v}.bias [heads*hd].
    qk_norm (Qwen3): each head's q and k vector [hd] is RMS-normalized and multiplied by
    blk.{i}.attn_{q,k}_norm.weight [hd] (shared by the heads) before RoPE."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    x = w["token_embd.weight"][tokens]
    t = len(tokens)
    mask = np.triu(np.full((t, t), -np.inf), k=1)
    for i in range(n_layers):
        p = f"blk.{i}."
        h = _rms_norm(x, w[p + "attn_norm.weight"], eps)
        proj = {}
        for name in ("q", "k", "v"):
            y = h @ w[p + f"attn_{name}.weight"].T
            if qkv_bias:
                y = y + w[p + f"attn_{name}.bias"]
            proj[name] = y
        q = proj["q"].reshape(t, n_heads, -1)
        k = proj["k"].reshape(t, n_kv_heads, -1)
        v = proj["v"].reshape(t, n_kv_heads, -1)
        if qk_norm:
            q = _rms_norm(q, w[p + "attn_q_norm.weight"], eps)
            k = _rms_norm(k, w[p + "attn_k_norm.weight"], eps)
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


_HF_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
               "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_names_of_hf(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face tensor names (model.layers.{i}.self_attn.q_proj.weight, ...) -> the GGUF names
    `llama_logits` reads. Both store [out, in], HF q/k rows in the "half" RoPE layout."""
    out = {}
    for name, value in w.items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = value
        elif name == "model.norm.weight":
            out["output_norm.weight"] = value
        elif name == "lm_head.weight":
            out["output.weight"] = value
        else:
            _, _, i, suffix = name.split(".", 3)
            out[f"blk.{i}.{_HF_TO_GGUF[suffix]}"] = value
    return out
