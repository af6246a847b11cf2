"""A lean decoder for inference: fused weights, a KV cache in slots, sequences that join and leave.

Why not HF's forward: one decode step of SmolLM2-135M through it is ~1000 small tensor ops of
Python and dispatch overhead around 211 matmuls, so on 2 CPU cores it reaches ~15% of what
memory bandwidth allows (BENCHMARKS.md §7). Here a step is the same arithmetic in ~20 ops a
layer: q/k/v fused into one matmul, gate/up into one, `F.rms_norm`, one SDPA call with grouped
KV heads, the cache written in place. Matmuls of up to 16 rows (decode steps, speculative
checks) go through model/bf16_gemm.py's kernel where the CPU has AVX512-BF16, which streams the
weights at close to memory bandwidth (1.6x a batch-1 step, BENCHMARKS.md §7, stop 25).
Optionally a lone row reads int8 weights (per output channel scales,
`torch._weight_int8pack_mm`), which halves the bytes a batch-1 step reads.

The KV cache has `slots` rows; a sequence lives in one row, and the caller (model/generation.py)
keeps the live ones packed in rows 0..n-1 (`move` fills a hole), so a decode step of n sequences
reads plain views of the cache. Each row has its own length; a step masks what lies beyond it.

Numerics follow transformers' Llama (RMSNorm in float32, RoPE tables from the model's own rotary
module, residual stream in the model's dtype), so h_T and greedy tokens agree with the HF path
(tests/model/test_engine.py; the agreement table is in BENCHMARKS.md §7).

Supported: Llama-shaped models (Llama, SmolLM2, Mistral without a sliding window) with no
biases and SiLU MLPs, LoRA merged. `unsupported_reason(lm)` says why another model is not; the
caller then keeps the HF backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from model import bf16_gemm

Quantize = Literal["none", "int8", "auto"]

# Which path a matmul takes, measured on a 2-core CPU with SmolLM2's shapes (BENCHMARKS.md §7,
# "kernels by row count"): oneDNN-prepacked bf16 weights give `F.linear`'s numbers bit for bit
# at every row count and beat it from a decode step of 1 row (1.4x) to a prefill of ~190
# (1.04-1.07x); model/bf16_gemm.py's kernel beats prepacked weights for 1-16 rows (1.5-1.7x for
# one row) and takes those, outside exact mode; int8 weights beat prepacked bf16 only for a
# single row (they read half the bytes, but their kernel loses from 2-4 rows on), so they serve
# at most INT8_ROWS rows.
INT8_ROWS = 1


def unsupported_reason(lm: torch.nn.Module) -> str | None:
    """None when `DecoderEngine` can run `lm`, else why not (for logs and errors)."""
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in ("llama", "mistral"):
        return f"model type {getattr(cfg, 'model_type', None)!r} is not llama-shaped"
    if type(lm).__name__.startswith("Peft"):
        return "a peft model: merge the LoRA adapter first"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "attention or MLP biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    return None


def _can_pack(weight: torch.Tensor) -> bool:
    cpu_bf16 = weight.device.type == "cpu" and weight.dtype == torch.bfloat16
    return cpu_bf16 and torch.backends.mkldnn.is_available()


class Linear:
    """y = x W^T from a (N, K) weight. On the CPU in bf16 the rows go through a oneDNN-prepacked
    copy of the weight (the same numbers as `F.linear`, faster); with `kernel`, up to
    bf16_gemm.ROWS rows (a decode step, a speculative check) go through model/bf16_gemm.py's
    kernel instead, which streams the weight at memory speed (its own copy of the weight, in its
    layout); with `quantize="int8"` a lone row goes through int8 weights with per-row scales
    (see INT8_ROWS)."""

    def __init__(self, weight: torch.Tensor, quantize: Quantize, kernel: bool = False) -> None:
        self.weight = weight.detach().contiguous()
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.packed: torch.Tensor | None = None
        self.kernel: torch.Tensor | None = None
        if quantize == "int8":
            w = self.weight.float()
            scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
            q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.int8 = (q, scales.to(self.weight.dtype))
        if _can_pack(self.weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)
        if kernel and bf16_gemm.fits(self.weight):
            self.kernel = bf16_gemm.pack(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (M, K)
        rows = x.shape[0]
        if self.int8 is not None and rows <= INT8_ROWS:
            return torch._weight_int8pack_mm(x, *self.int8)
        if self.kernel is not None and 0 < rows <= bf16_gemm.ROWS:
            return bf16_gemm.linear(x, self.kernel)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: Linear
    o: Linear
    ln2: torch.Tensor
    gate_up: Linear
    down: Linear


class DecoderEngine:
    """Inference-only forward of a Llama-shaped causal LM over a slot KV cache.

    All methods run under `torch.inference_mode()` and take plain token id lists; hidden states
    come back after the final norm (what `R2ec.decoder_hidden` returns), one per call row."""

    def __init__(
        self,
        lm: PreTrainedModel,
        slots: int = 8,
        max_len: int = 1024,
        quantize: Quantize = "none",
        exact: bool = False,
    ) -> None:
        """`exact`: a lone sequence's attention per query head, as transformers computes it, so
        greedy tokens follow the reference's bit for bit; by default the query heads that share a
        KV head go through SDPA as one group (the same arithmetic in another order: 1.11x a
        batch-1 step, and a near-tie in some greedy texts flips; BENCHMARKS.md §7). Exact mode
        also prefills as the reference does: per-head attention under a boolean mask after
        cached positions, and every row through every layer (no `last_only` trim)."""
        reason = unsupported_reason(lm)
        if reason is not None:
            raise ValueError(f"the fast decoder cannot run this model: {reason}")
        if slots < 1 or max_len < 2:
            raise ValueError(f"need slots >= 1 and max_len >= 2, got {slots}, {max_len}")
        cfg = lm.config
        self.dtype = next(lm.parameters()).dtype
        on_cpu = next(lm.parameters()).device.type == "cpu"
        if quantize == "auto":  # int8 where its kernel runs: a bfloat16 model on the CPU
            quantize = "int8" if self.dtype == torch.bfloat16 and on_cpu else "none"
        if quantize == "int8" and self.dtype != torch.bfloat16:
            raise ValueError("int8 weights need a bfloat16 model (the int8 kernel reads bf16 activations)")
        self.device = next(lm.parameters()).device
        base = lm.get_decoder()
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.eps = float(cfg.rms_norm_eps)
        self._scale = self.head_dim**-0.5
        self.embed = base.embed_tokens.weight.detach()
        self.norm = base.norm.weight.detach()
        # model/bf16_gemm.py's kernel for steps of few rows, where this machine runs it; not in
        # exact mode, whose point is the reference's rounding
        if exact:
            self.kernel_reason: str | None = "exact mode keeps oneDNN's rounding"
        elif self.dtype != torch.bfloat16 or not on_cpu:
            self.kernel_reason = "not a bfloat16 model on the CPU"
        else:
            self.kernel_reason = bf16_gemm.unavailable_reason()
        kernel = self.kernel_reason is None
        self.lm_head = Linear(lm.get_output_embeddings().weight, quantize, kernel)
        self.layers = []
        for layer in base.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
            self.layers.append(
                _Layer(
                    ln1=layer.input_layernorm.weight.detach(),
                    qkv=Linear(qkv, quantize, kernel),
                    o=Linear(att.o_proj.weight, quantize, kernel),
                    ln2=layer.post_attention_layernorm.weight.detach(),
                    gate_up=Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), quantize, kernel),
                    down=Linear(mlp.down_proj.weight, quantize, kernel),
                )
            )
        rotary = base.rotary_emb
        self._inv_freq = rotary.inv_freq.detach().float()
        self._rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.quantize = quantize
        self.exact = exact
        self.slots = slots
        # one more cache slot than callers see: it holds the shared prompt head (`set_prefix`)
        self._lens = [0] * (slots + 1)
        self._head = slots
        self.prefix: list[int] = []
        self.max_len = 0
        self._grow(max_len)

    @property
    def lens(self) -> list[int]:
        """Tokens held by each slot."""
        return self._lens[: self.slots]

    # ------------------------------------------------------------------ cache
    def _grow(self, max_len: int) -> None:
        """(Re)allocate the cache and RoPE tables for `max_len` positions, keeping the content."""
        shape = (len(self.layers), self.slots + 1, self.n_kv, max_len, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.max_len:
            k[..., : self.max_len, :] = self.k
            v[..., : self.max_len, :] = self.v
        self.k, self.v, self.max_len = k, v, max_len
        pos = torch.arange(max_len, dtype=torch.float32, device=self.device)
        freqs = pos[:, None] * self._inv_freq.to(self.device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_len, head_dim), as transformers builds it
        self.cos = (emb.cos() * self._rope_scale).to(self.dtype)
        self.sin = (emb.sin() * self._rope_scale).to(self.dtype)

    def _reserve(self, length: int) -> None:
        if length > self.max_len:
            self._grow(max(length, 2 * self.max_len))

    def reset(self, slot: int) -> None:
        """Forget the sequence in `slot` (its rows are overwritten by the next one)."""
        self._lens[slot] = 0

    @property
    def matmul_path(self) -> str:
        """Which path the matmuls of few rows take: "bf16_kernel" (model/bf16_gemm.py), "onednn"
        (on the CPU without it: `kernel_reason` says why), or the device type off the CPU
        ("cuda": torch's GPU matmuls); "int8+" in front with int8 weights, which take a lone
        row's steps."""
        if self.device.type != "cpu":
            path = self.device.type
        else:
            path = "bf16_kernel" if self.kernel_reason is None else "onednn"
        return f"int8+{path}" if self.quantize == "int8" else path

    @property
    def can_speculate(self) -> bool:
        """Whether a checked draft (`extend`, several rows) computes what plain decode steps
        would, up to bf16 summation order: not in exact mode, whose point is the reference's
        very rounding, nor with int8 weights, which serve one-row steps only (a draft's rows
        would run on bf16 and mix the two models' texts)."""
        return not self.exact and self.quantize != "int8"

    def truncate(self, slot: int, length: int) -> None:
        """Keep only the first `length` positions of `slot`: the positions of a speculative
        draft the model did not confirm are forgotten (their rows are overwritten later)."""
        if not 0 <= length <= self._lens[slot]:
            raise ValueError(f"slot {slot} holds {self._lens[slot]} positions, cannot keep {length}")
        self._lens[slot] = length

    def set_prefix(self, ids: Sequence[int]) -> None:
        """Keep the KV cache of `ids`, the head every user prompt starts with (chat template,
        system turn, instruction), so `prefill(..., reuse_prefix=True)` copies it instead of
        computing it again: prefix caching, for the one prefix all requests share."""
        self.prefix = list(ids)
        self._lens[self._head] = 0
        if self.prefix:
            self.prefill(self._head, self.prefix, last_only=True)

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """Copy the sequence in `src` to `dst` (to keep live sequences packed) and free `src`.
        Under inference mode, as the forwards: a cache that grew in one (`_grow`) is an
        inference tensor, which torch refuses to write in place outside it."""
        if src == dst:
            return
        n = self._lens[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self._lens[dst], self._lens[src] = n, 0

    # ------------------------------------------------------------------ forward
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _qkv(
        self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, H) -> q (rows, heads, d) and k (rows, kv heads, d) with RoPE applied, and v
        (rows, kv heads, d). q and k lie side by side in the fused projection, so one RoPE call
        rotates both (the same elementwise arithmetic as two, half the ops)."""
        h = layer.qkv(self._rms(x, layer.ln1))
        d, nq, nk = self.head_dim, self.n_heads, self.n_kv
        qk = self._rope(h[:, : (nq + nk) * d].view(-1, nq + nk, d), cos, sin)
        q, k = qk.split([nq, nk], dim=1)
        return q, k, h[:, (nq + nk) * d :].view(-1, nk, d)

    def _finish_layer(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + layer.o(attn)
        gate, up = layer.gate_up(self._rms(x, layer.ln2)).chunk(2, dim=-1)
        return x + layer.down(F.silu(gate) * up)

    @torch.inference_mode()
    def prefill(
        self, slot: int, ids: Sequence[int], reuse_prefix: bool = False, last_only: bool = False
    ) -> torch.Tensor:
        """Append `ids` to the sequence in `slot` (empty after `reset`); final hidden states of
        the new positions, (T, H). Used for prompts and for the closing marker after reasoning.

        `reuse_prefix`: when the slot is empty and `ids` starts with `set_prefix`'s tokens (and
        goes on), their cached keys and values are copied in and only the rest is computed; the
        hidden states returned are then those of the rest (the last row is the same).

        `last_only`: return only the last position's state, (1, H), which is all the service
        reads (h_T at the marker, or the logits of the first written token). The last layer then
        writes every position's keys and values but runs its attention, o-projection and MLP on
        that one row: most of one layer of SmolLM2's thirty (with the grouped attention below,
        1.05-1.07x a no-reasoning prefill, BENCHMARKS.md §7, stop 24). Not in exact
        mode, whose point is the reference's rounding, nor with int8 weights, which would take
        that one row (they serve one-row decode steps only)."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        p = len(self.prefix)
        if reuse_prefix and p and not self._lens[slot] and len(ids) > p and list(ids[:p]) == self.prefix:
            # the cache already holds p positions (the head slot's); the rest is reserved below
            self.k[:, slot, :, :p] = self.k[:, self._head, :, :p]
            self.v[:, slot, :, :p] = self.v[:, self._head, :, :p]
            self._lens[slot], ids = p, ids[p:]
        start, T = self._lens[slot], len(ids)
        self._reserve(start + T)
        x = self.embed[torch.tensor(list(ids), device=self.device)]  # (T, H)
        cos, sin = self.cos[start : start + T, None], self.sin[start : start + T, None]  # (T, 1, d)
        total = start + T
        mask = self._prefill_mask(start, T) if start and T > 1 else None
        trimmed = last_only and T > 1 and not self.exact and self.quantize != "int8"
        trim = len(self.layers) - 1 if trimmed else -1
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k[i, slot, :, start:total] = k.transpose(0, 1)
            self.v[i, slot, :, start:total] = v.transpose(0, 1)
            if i == trim:  # only the last row goes on: one query that sees every position
                q, x, attn_mask = q[-1:], x[-1:], None
            else:
                attn_mask = mask
            x = self._finish_layer(layer, x, self._prefill_attention(i, slot, q, total, attn_mask))
        self._lens[slot] = total
        out = self._rms(x, self.norm)
        return out[-1:] if last_only else out

    def computed_tokens(self, ids: Sequence[int], reuse_prefix: bool = False) -> int:
        """Positions a prefill of `ids` from an empty slot computes: all of them, less the
        shared prompt head (`set_prefix`) where `reuse_prefix` copies its keys and values in."""
        p = len(self.prefix)
        if reuse_prefix and p and len(ids) > p and list(ids[:p]) == self.prefix:
            return len(ids) - p
        return len(ids)

    @property
    def can_prefill_many(self) -> bool:
        """Whether `prefill_many` runs: not in exact mode, which prefills every prompt whole and
        alone, as the reference does."""
        return not self.exact

    @torch.inference_mode()
    def prefill_many(self, prompts: Sequence[Sequence[int]], reuse_prefix: bool = False) -> torch.Tensor:
        """The last position's final hidden state of each prompt, (n, H), as `prefill(slot, ids,
        reuse_prefix, last_only=True)` from an empty slot gives it, for n prompts in one forward:
        a no-reasoning request's h_T after [prompt; marker] needs nothing else. Every matmul
        runs over all the prompts' new positions packed into one (sum of lengths, H) block (one
        read of each weight for them all, fuller matmuls), and each layer's attention is one
        SDPA call over the prompts padded to the longest, each query seeing its own prompt's
        earlier positions (and the shared head's, copied from the head slot) through an
        additive mask. No slot is read or written: the keys and values live in this call.

        Another summation order than n prefills one by one (the rows of a matmul are blocked
        differently, the attention sees padded positions under -inf), so in bf16 the last bits
        of h_T differ from a lone prefill's, as they do between HF batch shapes; on float32
        weights it is the lone prefill's to rounding (tests/model/test_engine.py)."""
        if not prompts or any(len(ids) == 0 for ids in prompts):
            raise ValueError("prefill_many needs at least one prompt, each of at least one token")
        if not self.can_prefill_many:
            raise ValueError("exact mode prefills one prompt at a time (prefill)")
        dev, p = self.device, len(self.prefix)
        n = len(prompts)
        starts = [p if self.computed_tokens(ids, reuse_prefix) < len(ids) else 0 for ids in prompts]
        rests = [list(ids[s:]) for ids, s in zip(prompts, starts, strict=True)]
        lens = [len(r) for r in rests]
        width = max(s + t for s, t in zip(starts, lens, strict=True))
        T = max(lens)
        self._reserve(width)  # the RoPE tables (no slot is written)
        row = torch.repeat_interleave(torch.arange(n, device=dev), torch.tensor(lens, device=dev))  # (N,)
        local = torch.cat([torch.arange(t, device=dev) for t in lens])  # (N,): index within its rest
        pos = torch.tensor(starts, device=dev)[row] + local  # (N,): absolute position
        last = torch.tensor(lens, device=dev).cumsum(0) - 1  # (n,): each prompt's last packed row
        x = self.embed[torch.tensor([t for r in rests for t in r], device=dev)]  # (N, H)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (N, 1, d)
        headed = [j for j, s in enumerate(starts) if s]  # prompts that copy the shared head's keys
        group, d, nk = self.n_heads // self.n_kv, self.head_dim, self.n_kv
        keys_at = torch.arange(width, device=dev)

        def bias(query_pos: torch.Tensor) -> torch.Tensor:
            """(n, m) absolute query positions -> (n, 1, group * m, width) additive mask: each
            query sees its prompt's positions up to its own, the query heads of a KV head
            stacked as in `_prefill_attention`."""
            seen = keys_at[None, None, :] <= query_pos[:, :, None]  # (n, m, width)
            b = torch.zeros(seen.shape, dtype=self.dtype, device=dev).masked_fill_(~seen, -torch.inf)
            return b[:, None].repeat(1, 1, group, 1)

        # padded query slots (a prompt shorter than the longest) see position 0 only: defined, unread
        qpos = torch.zeros(n, T, dtype=torch.long, device=dev)
        qpos[row, local] = pos
        mask, last_mask = bias(qpos), bias(pos[last][:, None])
        trimmed = not self.exact and self.quantize != "int8"  # as `prefill`'s last_only
        trim = len(self.layers) - 1 if trimmed else -1
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # (N, heads, d), (N, kv, d), (N, kv, d)
            keys = torch.zeros(n, nk, width, d, dtype=self.dtype, device=dev)
            values = torch.zeros_like(keys)
            if headed:
                keys[headed, :, :p] = self.k[i, self._head, :, :p]
                values[headed, :, :p] = self.v[i, self._head, :, :p]
            keys[row, :, pos] = k
            values[row, :, pos] = v
            if i == trim:  # only each prompt's last row goes on, as `prefill(..., last_only=True)`
                x = x[last]
                grouped = q[last].view(n, nk, group, d)  # one query per prompt: (n, kv, group, d)
                out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=last_mask)
                attn = out.reshape(n, -1)
            else:
                padded = q.new_zeros(n, T, self.n_heads, d)
                padded[row, local] = q
                grouped = padded.view(n, T, nk, group, d).permute(0, 2, 3, 1, 4).reshape(n, nk, group * T, d)
                out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
                attn = out.view(n, nk, group, T, d).permute(0, 3, 1, 2, 4).reshape(n, T, -1)[row, local]
            x = self._finish_layer(layer, x, attn)
        out = self._rms(x, self.norm)
        return out if trimmed else out[last]

    def _prefill_mask(self, start: int, T: int) -> torch.Tensor:
        """T new positions after `start` cached ones see those and each other causally. Exact
        mode: a boolean (T, start + T) mask, as the reference's SDPA call takes it. Otherwise
        an additive one, repeated for the query heads that share a KV head, (group * T, start +
        T): `_prefill_attention` runs each KV head's queries as one SDPA call, the same
        attention as per-head SDPA (a prefill's h_T at cosine 1.00000 of it) in 0.88x its time
        on SmolLM2's 9 / 3 heads (BENCHMARKS.md §7, stop 24)."""
        seen = torch.ones(T, start + T, dtype=torch.bool, device=self.device).tril(start)
        if self.exact:
            return seen
        bias = torch.zeros(T, start + T, dtype=self.dtype, device=self.device).masked_fill_(~seen, -torch.inf)
        return bias.repeat(self.n_heads // self.n_kv, 1)

    def _prefill_attention(
        self, i: int, slot: int, q: torch.Tensor, total: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Layer i's attention for the T newest positions of `slot` (q: (T, heads, d)), with
        `total` positions cached: causal among themselves when the slot held nothing before,
        through `mask` (`_prefill_mask`) when it did; (T, heads * d)."""
        T = q.shape[0]
        keys, values = self.k[i, slot, None, :, :total], self.v[i, slot, None, :, :total]
        if mask is None or mask.dtype == torch.bool:
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],  # (1, heads, T, d)
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None and T > 1 and T == total,
                enable_gqa=self.n_kv != self.n_heads,
            )[0]  # (heads, T, d)
            return out.transpose(0, 1).reshape(T, -1)
        group, d = self.n_heads // self.n_kv, self.head_dim
        grouped = q.view(T, self.n_kv, group, d).permute(1, 2, 0, 3).reshape(1, self.n_kv, group * T, d)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)  # (1, kv, group*T, d)
        return out.view(self.n_kv, group, T, d).permute(2, 0, 1, 3).reshape(T, -1)

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """One step for the sequences in slots 0..n-1 (n = len(tokens)), each appending its
        token; final hidden states (n, H)."""
        n = len(tokens)
        if not 0 < n <= self.slots:
            raise ValueError(f"decode takes 1..{self.slots} tokens, got {n}")
        lens = self.lens[:n]
        if min(lens) == 0:
            raise ValueError("decode on an empty slot: prefill its prompt first")
        self._reserve(max(lens) + 1)
        pos = torch.tensor(lens, device=self.device)  # (n,): where each new token goes
        rows = torch.arange(n, device=self.device)
        width = max(lens) + 1
        bias = None  # rows shorter than the longest must not see past their own end
        if n > 1:
            seen = torch.arange(width, device=self.device)[None, :] <= pos[:, None]  # (n, L)
            bias = torch.zeros(n, 1, 1, width, device=self.device).masked_fill(
                ~seen[:, None, None], -torch.inf
            )
        x = self.embed[torch.tensor(list(tokens), device=self.device)]  # (n, H)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (n, 1, d)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            if n == 1:  # a plain copy into the one row's next position
                self.k[i, 0, :, lens[0]] = k[0]
                self.v[i, 0, :, lens[0]] = v[0]
            else:  # (n, kv heads, d) into each row's next position
                self.k[i][rows, :, pos] = k
                self.v[i][rows, :, pos] = v
            x = self._finish_layer(layer, x, self._decode_attention(i, q, n, width, bias))
        for j in range(n):
            self._lens[j] += 1
        return self._rms(x, self.norm)

    @torch.inference_mode()
    def extend(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append m tokens to each sequence in slots 0..n-1 (n = len(tokens), m tokens every row)
        in one forward, each row from its own length: speculative decoding's check of n drafts
        (model/generation.py). Final hidden states (n, m, H). The attention is the several-row
        decode path's (two fp32 matmuls and a softmax, query heads grouped by KV head), with each
        new position seeing its row's cache and the new positions before it."""
        n = len(tokens)
        if not 0 < n <= self.slots:
            raise ValueError(f"extend takes 1..{self.slots} rows, got {n}")
        m = len(tokens[0])
        if m < 1 or any(len(t) != m for t in tokens):
            raise ValueError("extend needs the same number (>= 1) of tokens in every row")
        lens = self.lens[:n]
        if min(lens) == 0:
            raise ValueError("extend on an empty slot: prefill its prompt first")
        self._reserve(max(lens) + m)
        dev = self.device
        pos = torch.tensor(lens, device=dev)[:, None] + torch.arange(m, device=dev)[None, :]  # (n, m)
        rows = torch.arange(n, device=dev)[:, None]
        width = max(lens) + m
        seen = torch.arange(width, device=dev)[None, None, :] <= pos[:, :, None]  # (n, m, width)
        bias = torch.zeros(n, 1, 1, m, width, device=dev).masked_fill(~seen[:, None, None], -torch.inf)
        x = self.embed[torch.tensor([list(t) for t in tokens], device=dev).flatten()]  # (n * m, H)
        flat = pos.flatten()
        cos, sin = self.cos[flat][:, None], self.sin[flat][:, None]
        group = self.n_heads // self.n_kv
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k[i][rows, :, pos] = k.view(n, m, self.n_kv, self.head_dim)
            self.v[i][rows, :, pos] = v.view(n, m, self.n_kv, self.head_dim)
            keys = self.k[i, :n, :, None, :width]  # (n, kv, 1, L, d)
            values = self.v[i, :n, :, None, :width]
            grouped = q.view(n, m, self.n_kv, group, self.head_dim).permute(0, 2, 3, 1, 4)
            out = self._masked_attention(grouped, keys, values, bias)  # (n, kv, group, m, d)
            attn = out.permute(0, 3, 1, 2, 4).reshape(n * m, -1).to(q.dtype)
            x = self._finish_layer(layer, x, attn)
        for j in range(n):
            self._lens[j] += m
        return self._rms(x, self.norm).view(n, m, -1)

    def _decode_attention(
        self, i: int, q: torch.Tensor, n: int, width: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Layer i's attention for one new query per row, (n, heads * d). One row sees all it
        has cached: SDPA, per query head when `exact` (transformers' numbers), else with the
        query heads of one KV head as that head's queries (BENCHMARKS.md §7). Several rows (a
        masked batch): two fp32 matmuls and a softmax, the same arithmetic in another order,
        faster than SDPA's CPU kernel for 8 rows of ~250 positions (1.4-5x, BENCHMARKS.md §7);
        the query heads that share a KV head go as one group."""
        keys, values = self.k[i, :n, :, :width], self.v[i, :n, :, :width]  # (n, kv heads, L, d)
        # the query heads that share a KV head, as that head's queries: (n, kv heads, group, d)
        grouped = q.view(n, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        if n == 1 and self.exact:  # one query per head, as transformers computes it
            out = F.scaled_dot_product_attention(
                q[:, :, None], keys, values, enable_gqa=self.n_kv != self.n_heads
            )  # (1, heads, 1, d)
            return out.reshape(1, -1)
        if n == 1:
            # SDPA over (kv heads) x (group queries) rather than (heads) x (1 query): 3.6x faster
            # on SmolLM2's 9 / 3 heads (the CPU kernel's work splits by query blocks), the same
            # arithmetic but its dot products go in another order
            return F.scaled_dot_product_attention(grouped, keys, values).reshape(1, -1)
        out = self._masked_attention(grouped, keys, values, bias)  # (n, kv, group, d)
        return out.to(q.dtype).reshape(n, -1)

    def _masked_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """softmax(q kᵀ · scale + bias) v in float32, for queries that attend to their rows'
        caches through an additive mask (several decode rows, `extend`'s drafts)."""
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)).mul_(self._scale).add_(bias)
        return torch.matmul(torch.softmax(scores, dim=-1), values.float())

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on final hidden states: (rows, H) -> (rows, vocab) float32."""
        return self.lm_head(hidden).float()
