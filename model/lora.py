"""The model to train: a warm start from a checkpoint or a fresh backbone, with LoRA.

Adapters (and anything else that trains) are kept in fp32 over a bf16 base; with
`lora_layers` they sit on the top decoder layers only, so backward stops there and the
layers below can be cached (model/item_table.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from model.backbone import BackboneConfig, load_backbone
from model.checkpoint import load_checkpoint_model, read_meta, resolve_checkpoint
from model.prompts import PromptConfig
from model.r2ec import R2ec
from model.recpo import RecPOConfig

log = logging.getLogger(__name__)


def build_model(cfg: RecPOConfig, base: str, category: str) -> tuple[R2ec, str]:
    """The trainable model and the base reference its checkpoints will name.

    `base` is a backbone reference (smollm2, tiny, HF dir, .gguf) or a checkpoint to
    warm-start from (what scheduled retraining does). A LoRA checkpoint keeps training
    its adapter; anything else gets a fresh adapter when cfg.lora.
    """
    try:
        ckpt_path = resolve_checkpoint(base)
    except ValueError:
        ckpt_path = None
    if ckpt_path is not None:
        meta = read_meta(ckpt_path)
        continue_adapter = meta["weights"] == "lora" and cfg.lora
        # the model alone: the trainer builds its own item table (a catalog encode here, for a
        # last/ saved without one, would be thrown away)
        model = load_checkpoint_model(ckpt_path, dtype=cfg.dtype, trainable=continue_adapter, merge_lora=True)
        base_ref = meta["base"] if meta["weights"] != "full" else str(ckpt_path / "model")
        if continue_adapter:
            _cast_trainable_fp32(model.lm)
            peft = model.lm.peft_config["default"]
            log.info(
                "warm start from %s: its adapter (r=%d, alpha=%d, layers %s) and prompts train on; "
                "the config's lora_r, lora_alpha, lora_layers, system_prompt and max_history do not apply",
                ckpt_path, peft.r, peft.lora_alpha, peft.layers_to_transform or "all",
            )  # fmt: skip
            return model, base_ref
    else:
        lm, tok = load_backbone(BackboneConfig(base=base, dtype=cfg.dtype, seed=cfg.seed))
        prompts = PromptConfig(
            category=category,
            system_prompt=cfg.system_prompt,
            max_history=cfg.max_history,
            include_time=cfg.include_time,
        )
        model, base_ref = R2ec(lm, tok, prompts, tau=cfg.tau), base
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            layers_to_transform=_top_layers(model.lm, cfg.lora_layers),
            bias="none",
        )
        linear = _linear_layer_names(model.lm)  # before peft wraps them
        model.lm = get_peft_model(model.lm, lora)
        _warn_unmatched_targets(model.lm, cfg.lora_target_modules, linear)
        _cast_trainable_fp32(model.lm)
    model.tau = cfg.tau
    return model, base_ref


def _linear_layer_names(lm: torch.nn.Module) -> list[str]:
    """The last name of each linear layer of an unwrapped model, the output layer left out
    (peft's "all-linear" leaves it out too)."""
    head = lm.get_output_embeddings()
    linear = (n for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return sorted({n.rsplit(".", 1)[-1] for n in linear})


def _warn_unmatched_targets(lm: torch.nn.Module, targets: str | Sequence[str], linear: Sequence[str]) -> None:
    """The default targets are Llama's projections; another family's (Phi-3's fused qkv_proj and
    gate_up_proj) match only some, and peft adapts the rest without a word.

    A target matches as peft matches a list: a module's full name is it or ends in "." + it
    ("q_proj", "self_attn.q_proj"). A str target ("all-linear", a regex) is peft's own to
    resolve and is not checked. `linear` are the layer names of the model before wrapping."""
    if isinstance(targets, str):
        return
    names = list(lm.targeted_module_names)

    def matches(target: str) -> bool:
        return any(n == target or n.endswith("." + target) for n in names)

    missing = [t for t in targets if not matches(t)]
    if missing:
        log.warning(
            "lora_target_modules %s match no layer of this backbone, so only %s get adapters; its "
            "linear layers are %s: set lora_target_modules (--set 'lora_target_modules=[...]') to adapt them",
            missing, [t for t in targets if t not in missing], list(linear),
        )  # fmt: skip


def _top_layers(lm: torch.nn.Module, n: int | None) -> list[int] | None:
    if n is None:
        return None
    total = lm.config.num_hidden_layers
    if n > total:
        raise ValueError(f"lora_layers={n} but the backbone has {total} layers")
    return list(range(total - n, total))


def _cast_trainable_fp32(lm: torch.nn.Module) -> None:
    # bf16 cannot hold small AdamW updates; adapters train in fp32 over a bf16 base.
    for p in lm.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trainable_parameters(model: R2ec) -> list[torch.nn.Parameter]:
    return [p for p in model.lm.parameters() if p.requires_grad]


def weights_kind(model: R2ec) -> str:
    """What a checkpoint of this model stores: "lora" (adapter over a base) or "full"."""
    return "lora" if hasattr(model.lm, "peft_config") else "full"
