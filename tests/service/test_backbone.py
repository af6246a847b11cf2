"""The service checks the backbone a checkpoint records (model/backbone_digest.py) when it
starts: another one refuses the start unless R2EC_ALLOW_BACKBONE_MISMATCH; /readyz and
r2ec_model_info say which backbone serves and how it compared."""

from __future__ import annotations

import pytest

from model.backbone import tiny_model, tiny_tokenizer
from model.backbone_digest import BackboneMismatch
from tests.conftest import checkpoint_over_a_local_backbone
from tests.service.conftest import app_for, serve
from tests.service.test_app import metric

pytestmark = pytest.mark.asyncio


async def test_readyz_and_model_info_name_the_backbone(ckpt):
    app = app_for(ckpt)
    async with serve(app) as client:
        ready = (await client.get("/readyz")).json()
        assert ready["backbone"] == {"status": "match", "loaded": "tiny", "recorded": "tiny"}
        text = (await client.get("/metrics")).text
        assert metric(text, "r2ec_model_info", backbone="tiny", backbone_check="match") == 1


async def test_a_checkpoint_over_other_weights_refuses_the_start_unless_allowed(tiny_dataset, tmp_path):
    ckpt, mine, meta = checkpoint_over_a_local_backbone(tiny_dataset.items, tmp_path)
    tokenizer = tiny_tokenizer()
    recorded = meta["backbone"]["sha256"]
    tiny_model(tokenizer, seed=2).save_pretrained(mine)  # replaced in place: same path, same sizes

    with pytest.raises(BackboneMismatch, match=recorded):
        async with serve(app_for(ckpt)):
            pass
    app = app_for(ckpt, allow_backbone_mismatch=True)
    async with serve(app) as client:
        backbone = (await client.get("/readyz")).json()["backbone"]
        assert backbone["status"] == "mismatch_allowed" and backbone["recorded"] == f"sha256:{recorded}"
        assert backbone["loaded"].startswith("sha256:") and backbone["loaded"] != backbone["recorded"]
        text = (await client.get("/metrics")).text
        loaded = backbone["loaded"][: len("sha256:") + 12]
        assert metric(text, "r2ec_model_info", backbone=loaded, backbone_check="mismatch_allowed") == 1
        r = await client.post("/recommend", json={"history": [{"item_id": "i1"}], "reasoning": False})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "value", ["1", "true", "True", "yes", "on", "t", "y", "Y", "0", "false", "no", "off", "f", "n"]
)
async def test_every_load_reads_the_override_as_the_service_does(value, monkeypatch):
    """R2EC_ALLOW_BACKBONE_MISMATCH is the service's setting (pydantic reads it) and, where no
    caller passes one, what `r2ec train`, `r2ec retrain` and `r2ec recommend` read themselves
    (model/backbone_digest.py `allowed`): one value, one answer in both. "y" and "t" let the
    service load a checkpoint that retraining then refused."""
    from model.backbone_digest import allowed
    from service.config import Settings

    monkeypatch.setenv("R2EC_ALLOW_BACKBONE_MISMATCH", value)
    assert allowed(None) is Settings().allow_backbone_mismatch
