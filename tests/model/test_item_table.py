"""The item table with the tiny model: target counts, uniform draws, the frozen-layer cache."""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from model.item_table import ItemTable
from model.lora import build_model, trainable_parameters
from model.losses import log_expected_count
from model.recpo import RecPOConfig

TINY = dict(dtype="float32", max_completion_length=8, warmup_steps=0, eval_limit=4, lora_r=4, lora_alpha=8)


def _setup(cfg: RecPOConfig, ds):
    torch.manual_seed(0)
    model, _ = build_model(cfg, "tiny", ds.category)
    table = ItemTable.build(model, ds.items.to_dict("records"))
    model.lm.eval()
    table.refresh(model)
    return model, table


def test_history_mask_marks_each_rows_history_repeated_per_generation(tiny_dataset):
    cfg = RecPOConfig(**TINY)
    model, table = _setup(cfg, tiny_dataset)
    ids = table.item_ids
    mask = table.history_mask([[ids[0], ids[2], "not-in-catalog"], [ids[1]]], repeat=2)
    assert mask.shape == (4, len(ids))
    assert [row.nonzero().flatten().tolist() for row in mask] == [[0, 2], [0, 2], [1], [1]]


def test_sampled_negatives_are_uniform_draws_and_the_correction_counts_them(tiny_dataset):
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=4, **TINY)
    model, table = _setup(cfg, tiny_dataset)
    ids = table.item_ids
    torch.manual_seed(0)
    draws = table.sample_uniform(2000)
    assert set(draws) == set(ids)  # every item can be drawn ...
    assert max(draws.count(i) for i in ids) < 3 * 2000 / len(ids)  # ... about equally often
    assert table.sample_uniform(0) == []
    table.set_target_counts([ids[0]] * 5)
    q = table.log_q.exp()
    cols = [ids[0], ids[1]]
    # 4 targets drawn by popularity + 10 uniform draws: expected count 4 q + 10 / N per item
    expected = torch.log(4 * q[:2] + 10 / len(ids))
    log_q = table.log_q_of(cols)
    assert torch.allclose(log_expected_count(log_q, 4, 10, len(ids)), expected)
    # without sampled negatives it is log q plus a constant: the plain logQ correction
    plain = log_expected_count(log_q, 4, 0, len(ids)) - table.log_q[:2]
    assert torch.allclose(plain, torch.full((2,), math.log(4)))


def test_item_layer_cache_gives_the_full_forwards_vectors_and_gradients(tiny_dataset):
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=4, lora_layers=1, **TINY)
    model, table = _setup(cfg, tiny_dataset)
    layers = model.lm.config.num_hidden_layers
    assert model.frozen_layers() == layers - 1  # LoRA on the top layer only
    table.cache_lower(model, max_gb=1.0)
    assert table.lower is not None and table.lower_layers == layers - 1
    assert [len(h) for h in table.lower] == [len(p) for p in table.prompt_ids]
    ids = table.item_ids[:5]
    params = trainable_parameters(model)

    def vectors_and_grads(cached: bool):
        model.lm.zero_grad(set_to_none=True)
        vecs = (
            table.encode(model, ids)
            if cached
            else model.item_vectors_from_ids([table.prompt_ids[table.row[i]] for i in ids])
        )
        (vecs @ torch.arange(vecs.shape[1], dtype=torch.float32)).sum().backward()
        return vecs.detach(), [p.grad.clone() for p in params]

    full, full_grads = vectors_and_grads(cached=False)
    cached, cached_grads = vectors_and_grads(cached=True)
    assert torch.allclose(cached, full, atol=1e-5)
    assert all(torch.allclose(c, f, atol=1e-4) for c, f in zip(cached_grads, full_grads, strict=True))
    assert any(g.abs().sum() > 0 for g in cached_grads)
    # the cache is skipped where it would be wrong (every layer trains) or too big
    table.cache_lower(model, max_gb=0.0)
    assert table.lower is None
    everywhere, _ = build_model(dataclasses.replace(cfg, lora_layers=None), "tiny", tiny_dataset.category)
    assert everywhere.frozen_layers() == 0


def test_lower_layers_are_cached_only_where_the_split_forward_matches_the_full_one(tiny_model):
    from transformers import GraniteConfig, GraniteForCausalLM

    from model.r2ec import R2ec

    def top_layer_trains(model: R2ec) -> R2ec:
        for p in model.lm.parameters():
            p.requires_grad = False
        for p in model.lm.get_decoder().layers[-1].parameters():
            p.requires_grad = True
        return model

    tok = tiny_model.tokenizer
    llama = top_layer_trains(R2ec(copy.deepcopy(tiny_model.lm), tok))
    assert llama.frozen_layers() == llama.cacheable_layers() == 1
    # Granite multiplies inputs_embeds inside its decoder's forward, cached states included
    config = GraniteConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=12.0,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    granite = top_layer_trains(R2ec(GraniteForCausalLM(config), tok))
    assert granite.frozen_layers() == 1 and granite.cacheable_layers() == 0
