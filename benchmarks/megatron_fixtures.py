"""Make the Megatron-core test fixtures on a GPU machine (megatron-core's dist_checkpointing needs CUDA).

Builds a tiny GPT MoE with megatron-core's local (no Transformer Engine) layer spec — GQA, RoPE, RMSNorm,
SwiGLU experts, top-2 softmax routing, untied output layer — with seeded random weights (norms away from 1),
saves it as a ``torch_dist`` distributed checkpoint, and records the logits of fixed tokens and the model's
plain state dict, so CPU tests can check that sparsetron reads the checkpoint into a model giving the same
logits. Run under torchrun with one process::

    torchrun --standalone --nproc-per-node 1 benchmarks/megatron_fixtures.py --out tests/fixtures/megatron

With ``--verify DIR`` it instead loads the torch_dist checkpoint ``DIR`` (e.g. written by ``sparsetron
convert --to megatron``) into a fresh model of the same configuration and checks its logits equal the
recorded ones.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from megatron.core import dist_checkpointing, parallel_state  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

# megatron-core 0.16.1 without Transformer Engine leaves `te_general_gemm` undefined (its import sits in
# the failed TE import) yet tests it in the router's forward: define it as "not available".
if not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None

#: The fixture model; tests/test_convert_megatron.py reads the same numbers from ``model.json``.
MODEL = {
    "vocab_size": 128, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
    "kv_channels": 16, "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 96,
    "layernorm_epsilon": 1e-6, "rotary_base": 10000, "max_sequence_length": 64,
}  # fmt: skip


def build() -> GPTModel:
    m = MODEL
    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], kv_channels=m["kv_channels"],
        ffn_hidden_size=m["moe_ffn_hidden_size"], num_moe_experts=m["num_moe_experts"],
        moe_ffn_hidden_size=m["moe_ffn_hidden_size"], moe_router_topk=m["moe_router_topk"],
        moe_router_load_balancing_type="none", moe_token_dispatcher_type="alltoall",
        normalization="RMSNorm", layernorm_epsilon=m["layernorm_epsilon"], gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        params_dtype=torch.float32, use_cpu_initialization=True,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(num_experts=m["num_moe_experts"], normalization="RMSNorm")
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=m["vocab_size"],
        max_sequence_length=m["max_sequence_length"], position_embedding_type="rope",
        rotary_base=m["rotary_base"], share_embeddings_and_output_weights=False,
    ).cuda()  # fmt: skip


@torch.no_grad()
def logits_of(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    return model(tokens, positions, attention_mask=None).float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/megatron"))
    parser.add_argument(
        "--verify", type=Path, help="A torch_dist checkpoint to load and check against --out."
    )
    args = parser.parse_args()
    torch.distributed.init_process_group("nccl")
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(123)
    torch.manual_seed(123)
    model = build().eval()
    if args.verify:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(args.verify))
        model.load_state_dict(state)
        reference = torch.load(args.out / "logits.pt")
        got = logits_of(model, reference["tokens"].cuda())
        diff = (got - reference["logits"]).abs().max().item()
        print(json.dumps({"verify": str(args.verify), "max_abs_diff": diff, "ok": diff <= 1e-4}))
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("router.weight"):
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 0.08)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "torch_dist"
    checkpoint.mkdir()  # megatron's save wants an existing, empty directory
    dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint))
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(7))
    torch.save({"tokens": tokens, "logits": logits_of(model, tokens.cuda())}, args.out / "logits.pt")
    torch.save(
        {k: v.cpu() for k, v in model.state_dict().items() if v is not None}, args.out / "state_dict.pt"
    )
    megatron_version = __import__("megatron.core", fromlist=["__version__"]).__version__
    (args.out / "model.json").write_text(json.dumps({**MODEL, "megatron_core": megatron_version}, indent=2))
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    for key, entry in sorted(metadata.items()):
        print(
            key, tuple(getattr(entry, "size", ())), getattr(getattr(entry, "properties", None), "dtype", "")
        )


if __name__ == "__main__":
    main()
