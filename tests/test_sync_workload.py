"""A real RL-like workload: an HF Qwen2-MoE built from a config, fine-tuned in bf16 with AdamW at lr 1e-6;
every step is published and a rollout copy (another HF model instance) follows bit-exactly. The measured
changed fraction and bits per changed element are asserted loosely and printed."""

from __future__ import annotations

import pytest
import torch

from sparsetron.sync.codec import bits_view
from sparsetron.sync.publisher import DeltaPublisher
from sparsetron.sync.subscriber import DeltaSubscriber, module_tensors


def _model(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen2MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
        shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    )  # fmt: skip
    return transformers.Qwen2MoeForCausalLM(config).to(torch.bfloat16)


def test_bf16_adamw_at_lr_1e6_syncs_bit_exactly_with_few_bits_per_change(capsys):
    trainer, rollout = _model(0), _model(1)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-6, weight_decay=0.0)
    publisher = DeltaPublisher(module_tensors(trainer))
    subscriber = DeltaSubscriber(module_tensors(rollout))
    subscriber.apply(publisher.payloads_for(None), publisher.id)
    generator = torch.Generator().manual_seed(0)
    reports = []
    for _ in range(4):
        tokens = torch.randint(0, 512, (4, 64), generator=generator)
        loss = trainer(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reports.append(publisher.publish())
        subscriber.apply(publisher.payloads_for(subscriber.version), publisher.id)
        for name, tensor in module_tensors(trainer).items():
            assert torch.equal(bits_view(tensor), bits_view(subscriber.tensors[name])), name
    changed = sum(r.changed for r in reports) / sum(r.total for r in reports)
    bits = 8 * sum(r.payload_bytes for r in reports) / max(1, sum(r.changed for r in reports))
    with capsys.disabled():
        print(f"\nbf16 AdamW lr 1e-6: {changed:.3%} of elements changed per step, {bits:.1f} bits per change")
    # AdamW's first steps move every weight by ~lr, below half a bf16 ulp for all but the smallest weights.
    assert 0 < changed < 0.2
    assert bits <= 24  # small payloads carry fixed headers; the ≤ 16-bit coding is tested in the codec tests
