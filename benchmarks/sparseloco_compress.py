"""SparseLoCo compression of a 1B-parameter bf16 pseudo-gradient on one GPU.

Times, per outer step and with CUDA events: error feedback + chunked top-k + 2-bit quantisation
(:class:`ErrorFeedback`, whose heavy pass is the fused kernel of :mod:`sparsetron.kernels.chunk_topk`), then
packing the 12-bit indices and 2-bit codes on the device (the bytes the wire
format carries), and separately the whole ``wire.encode`` (packing, device→host copy, header, CRCs). The
anchor is ``torch.topk`` alone on the same chunk rows (fp32). Throughput is stated per bf16 input element
(2 bytes) and per fp32 error-buffer element (4 bytes, the basis of the top-k anchor).

    python3 benchmarks/sparseloco_compress.py [--params 1e9] [--inner-step-s S]

The inner step of the same model shape (a plain Llama-like decoder in bf16 with fp32 AdamW, SDPA attention,
``--step-tokens`` tokens per step on this GPU) is timed too, so the compression time is stated as a share of
an H=30 inner phase of that model on that GPU.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from cuda_timing import median_seconds

from sparsetron.parallel.data import wire
from sparsetron.parallel.data.bitpack import pack_bits
from sparsetron.parallel.data.compress import ErrorFeedback, chunking_for, to_chunks


def model_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """Weight matrices of a Llama-like decoder (d=2048, SwiGLU 5632) with about ``params`` elements."""
    dim, ffn, vocab = 2048, 5632, 32000
    layer = {"q": (dim, dim), "k": (dim, dim), "v": (dim, dim), "o": (dim, dim)}
    layer |= {"gate": (ffn, dim), "up": (ffn, dim), "down": (dim, ffn)}
    per_layer = sum(math.prod(s) for s in layer.values())
    layers = max(1, round((params - 2 * vocab * dim) / per_layer))
    shapes = {"embed": (vocab, dim), "head": (vocab, dim)}
    for i in range(layers):
        shapes |= {f"layers.{i}.{n}": s for n, s in layer.items()}
    return shapes


class _Block(torch.nn.Module):
    """Pre-norm decoder block with the shapes of :func:`model_shapes` (RMSNorm, SDPA causal, SwiGLU)."""

    def __init__(self, dim: int = 2048, ffn: int = 5632, heads: int = 16):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.o = torch.nn.Linear(dim, dim, bias=False)
        self.gate_up = torch.nn.Linear(dim, 2 * ffn, bias=False)
        self.down = torch.nn.Linear(ffn, dim, bias=False)
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(self.norm1(x_BSD)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        attn = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x_BSD = x_BSD + self.o(attn.transpose(1, 2).reshape(b, s, d))
        gate, up = self.gate_up(self.norm2(x_BSD)).chunk(2, dim=-1)
        return x_BSD + self.down(torch.nn.functional.silu(gate) * up)


def inner_step_seconds(layers: int, step_tokens: int, seq_len: int = 2048) -> float:
    """Median time of one AdamW training step (fwd+bwd+update, bf16 autocast, fp32 weights) of the model."""
    vocab, dim = 32000, 2048
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(vocab, dim),
            "blocks": torch.nn.ModuleList(_Block() for _ in range(layers)),
            "head": torch.nn.Linear(dim, vocab, bias=False),
        }
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    micro = 2  # sequences per micro-batch; gradient accumulation up to step_tokens
    tokens_BS = torch.randint(0, vocab, (micro, seq_len), device="cuda")
    accumulation = max(1, step_tokens // (micro * seq_len))

    def step():
        for _ in range(accumulation):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                x = model["embed"](tokens_BS)
                for block in model["blocks"]:
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                logits = model["head"](x).float()
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens_BS.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, 3, warmup=1)


def compression_timings(shapes: dict[str, tuple[int, ...]], topk: int, bits: int, reps: int) -> dict:
    """Seconds of compress+pack, of wire.encode and of topk alone over bf16 pseudo-gradients of ``shapes``."""
    torch.manual_seed(0)
    deltas = {n: (1e-3 * torch.randn(s, device="cuda")).bfloat16() for n, s in shapes.items()}
    compressor = ErrorFeedback(chunk=4096, topk=topk, bits=bits, decay=0.95)
    for name, delta in deltas.items():  # error buffers exist from the first outer step on
        compressor.buffer(name, delta)

    def compress_and_pack():
        sent = compressor.compress_many(deltas).values()
        # Every tensor's k·rows indices (12 bits) and codes (2 bits) fill whole bytes, so each tensor's wire
        # sections are byte-aligned slices of these two buffers.
        indices = pack_bits(torch.cat([s.indices_NK.reshape(-1) for s in sent]), 12)
        codes = pack_bits(torch.cat([s.codes_NK.reshape(-1) for s in sent]), bits)
        return indices, codes

    def encode():
        items = []
        for name, sent in compressor.compress_many(deltas).items():
            delta = deltas[name]
            items.append(
                wire.CompressedTensor(
                    name=name, shape=tuple(delta.shape), chunk=4096, indices_NK=sent.indices_NK,
                    codes_NK=sent.codes_NK, codebook=sent.codebook, bits=sent.bits,
                )
            )  # fmt: skip
        return wire.encode(items)

    rows = {n: to_chunks(d.float(), chunking_for(tuple(d.shape), 4096)) for n, d in deltas.items()}

    def topk_only():
        for x_NC in rows.values():
            torch.topk(x_NC.abs(), topk, dim=1, sorted=False)

    return {
        "compress_pack_s": median_seconds(compress_and_pack, reps),
        "wire_encode_s": median_seconds(encode, max(2, reps // 2), warmup=1),
        "topk_only_s": median_seconds(topk_only, reps),
        "payload_bytes": len(encode()),
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--step-tokens", type=int, default=65536, help="tokens per inner step on this GPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    shapes = model_shapes(args.params)
    numel = sum(math.prod(s) for s in shapes.values())
    in_bytes = numel * 2
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "params": numel,
        "topk": args.topk,
        "bits": args.bits,
    }
    result |= compression_timings(shapes, args.topk, args.bits, args.reps)
    torch.cuda.empty_cache()
    t_compress = result["compress_pack_s"]
    result["compress_pack_GBps_bf16_in"] = in_bytes / t_compress / 1e9
    result["compress_pack_GBps_fp32_error"] = numel * 4 / t_compress / 1e9
    result["topk_only_GBps_fp32_rows"] = numel * 4 / result["topk_only_s"] / 1e9
    result["ratio_vs_bf16"] = in_bytes / result["payload_bytes"]
    layers = sum(1 for n in shapes if n.endswith(".q"))
    result["inner_step_s"] = inner_step_seconds(layers, args.step_tokens)
    result["step_tokens"] = args.step_tokens
    result["share_of_H30_phase"] = t_compress / (30 * result["inner_step_s"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(
        "| params | compress+pack | GB/s bf16 Δ / fp32 e | wire.encode | topk alone (GB/s fp32) | payload | ×bf16 |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {numel / 1e9:.2f} B | {t_compress * 1e3:.1f} ms | {result['compress_pack_GBps_bf16_in']:.0f} / "
        f"{result['compress_pack_GBps_fp32_error']:.0f} | "
        f"{result['wire_encode_s'] * 1e3:.0f} ms | {result['topk_only_s'] * 1e3:.1f} ms "
        f"({result['topk_only_GBps_fp32_rows']:.0f}) | {result['payload_bytes'] / 2**20:.1f} MiB | "
        f"{result['ratio_vs_bf16']:.0f} |"
    )
    print(
        f"inner step ({args.step_tokens} tokens, bf16 AdamW): {result['inner_step_s']:.2f} s; compression is "
        f"{result['share_of_H30_phase']:.3%} of an H=30 phase"
    )


if __name__ == "__main__":
    main()
