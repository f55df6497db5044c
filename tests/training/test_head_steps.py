from __future__ import annotations

import torch

from clinfuse.config import to_dict
from clinfuse.fusion.adversary import AdversaryConfig
from clinfuse.fusion.model import FusionConfig, ModelConfig
from clinfuse.training.config import OptimConfig
from clinfuse.training.module import RiskModule


def _module(spec, head_steps: int) -> RiskModule:
    torch.manual_seed(0)
    cfg = ModelConfig(
        encoders={
            "gru_d": {"hidden": 8, "embed_dim": 8},
            "sgl_mlp": {"hidden": [8], "embed_dim": 8},
        },
        fusion=FusionConfig("early", {}),
        adversary=AdversaryConfig(enabled=True, hidden=0, head_steps=head_steps),
    )
    return RiskModule(to_dict(cfg), to_dict(spec), to_dict(OptimConfig(lr=0.05)))


def test_head_steps_move_only_the_heads_toward_the_confound(tiny_spec, batch_factory):
    batch = batch_factory(tiny_spec, batch_size=16)
    module = _module(tiny_spec, head_steps=6)
    out = module.model(batch)
    before = module.model.adversary_head_loss(out, batch).item()
    encoders = {k: v.clone() for k, v in module.model.encoders.state_dict().items()}
    refreshed = module._adversary_head_steps(out, batch)
    after = module.model.adversary_head_loss(out, batch).item()
    # Five Adam steps at lr 0.05 on a linear head with 16 rows: the heads' own loss drops.
    assert after < before - 0.05
    for key, value in module.model.encoders.state_dict().items():
        torch.testing.assert_close(value, encoders[key])
    # The joint step sees the updated heads, and no gradient is left on them.
    head = module.model.adversary.heads["site"]
    expected = head(out["fused"]).detach()
    torch.testing.assert_close(refreshed["adversary_logits"]["site"].detach(), expected)
    assert all(p.grad is None for p in module.model.adversary.parameters())


def test_one_head_step_is_the_plain_joint_update(tiny_spec, batch_factory):
    batch = batch_factory(tiny_spec, batch_size=8)
    module = _module(tiny_spec, head_steps=1)
    out = module.model(batch)
    assert module._adversary_head_steps(out, batch) is out
