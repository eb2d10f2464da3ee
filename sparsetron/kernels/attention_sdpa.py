"""Fused CUDA attention for one (query run, key run) pair through torch's own SDPA kernels; no communication.

Only the FULL and CAUSAL_DIAG pairs of :mod:`sparsetron.kernels.attention` come here: every query row sees
every key, or the pair is square with aligned global indices so that the kernels' built-in causal mask is
exactly ``j <= i``. Both kernels return the per-row log-sum-exp and accept an externally supplied (global)
output and LSE in backward, which is what exact merging over key blocks needs.

Calling convention, as torch's ring attention uses these ops
(``torch/distributed/tensor/experimental/_context_parallel/_attention.py``, torch 2.11 and 2.13):

- the ops take ``[B, H, S, D]``; we pass ``[B, S, H, D]`` storage transposed, the flash kernel's own layout,
  so nothing is copied, and out/dout then share strides as cuDNN's backward expects;
- query and key/value head counts must be equal (callers expand GQA heads locally);
- flash returns LSE ``[B, H, Sq]``; cuDNN ``[B, H, Sq, 1]`` (seen on 2.11, and 2.13's meta kernel agrees;
  torch < 2.9 returned ``[B, H, Sq]``) and its backward wants that same rank back; both fp32, natural log;
- the LSE given to backward must be contiguous (torch's ring makes its chunk contiguous for the same reason);
- ``cum_seq_q/k = None`` selects the dense (not varlen) kernels; cuDNN's backward takes the sequence lengths
  from ``max_q/max_k``, so those are the real lengths; without dropout the philox seed/offset are unused.
"""

from __future__ import annotations

import torch

FUSED_BACKENDS = ("flash", "cudnn")
_HALF_DTYPES = (torch.bfloat16, torch.float16)
# Head dims we send each kernel (multiples of 8); cuDNN only up to 128, the largest tested here.
_MAX_HEAD_DIM = {"flash": 256, "cudnn": 128}
_CUDNN_MIN_VERSION = 90000
# torch >= 2.9 keeps cuDNN's trailing stats dimension on the LSE, and its backward expects it back.
_CUDNN_LSE_KEEPS_LAST_DIM = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 9)

# The auto rule, from benchmarks/attention_kernels.py on one H100 (torch 2.11, cuDNN 9.19, bf16, B=1, H=32,
# D=128), fwd+bwd ms of square pairs, flash | cuDNN, two runs: 512 causal 0.114 | 0.119 and 0.169 | 0.089,
# full 0.120 | 0.115 and 0.094 | 0.098 (a tie within noise); 1K causal 0.239 | 0.182 and 0.232 | 0.206, full
# 0.261 | 0.198 and 0.272 | 0.213; 4K causal 1.92 | 1.10; 8K-64K cuDNN 1.6-1.8x faster (32K causal 567 vs
# 317 TFLOP/s). So cuDNN from 1K×1K query×key tokens up, flash below, where neither wins reliably.
CUDNN_MIN_TOKENS = 1024


def unsupported_reason(backend: str, q_BSHD: torch.Tensor) -> str | None:
    """Why ``backend`` ('flash' or 'cudnn') cannot run on tensors like ``q_BSHD``, or None if it can."""
    if q_BSHD.device.type != "cuda":
        return f"tensors are on {q_BSHD.device.type}, the fused kernels are CUDA-only"
    if q_BSHD.dtype not in _HALF_DTYPES:
        return f"dtype is {q_BSHD.dtype}, the fused kernels take bfloat16 or float16"
    head_dim = q_BSHD.shape[-1]
    if head_dim % 8 or head_dim > _MAX_HEAD_DIM[backend]:
        return f"head dim {head_dim} is not a multiple of 8 up to {_MAX_HEAD_DIM[backend]}"
    if torch.cuda.get_device_capability(q_BSHD.device) < (8, 0):
        return "the GPU is older than sm_80"
    if backend == "flash" and not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention"
    if backend == "cudnn" and (torch.backends.cudnn.version() or 0) < _CUDNN_MIN_VERSION:
        return f"cuDNN {torch.backends.cudnn.version()} is older than 9.0"
    return None


def runnable(q_BSHD: torch.Tensor) -> tuple[str, ...]:
    """The fused kernels that can run on tensors like ``q_BSHD`` (none on the CPU)."""
    return tuple(b for b in FUSED_BACKENDS if unsupported_reason(b, q_BSHD) is None)


def pick(kernels: tuple[str, ...], seq_q: int, seq_k: int) -> str:
    """The faster of the fused ``kernels`` (non-empty) for a ``seq_q × seq_k`` pair (rule above)."""
    big = seq_q * seq_k >= CUDNN_MIN_TOKENS * CUDNN_MIN_TOKENS
    return "cudnn" if "cudnn" in kernels and (big or "flash" not in kernels) else "flash"


def _bhsd(x_BSHD: torch.Tensor) -> torch.Tensor:
    return x_BSHD.transpose(1, 2)


def _lse_BHS(lse: torch.Tensor, seq_q: int) -> torch.Tensor:
    # Drops cuDNN's trailing stats dim and any padding of the row axis some kernels allocate.
    return lse.flatten(2)[:, :, :seq_q].float()


def _unused_rng(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def fused_forward(
    backend: str,
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair's ``(out_BSHD fp32, lse_BHS fp32)`` with flash or cuDNN; no communication.

    q: [B, Sq, H, D]; k, v: [B, Sk, H, D] (equal heads), bf16/fp16 on CUDA, last dim contiguous.
    ``causal`` applies the kernel's own mask, which is ``j <= i`` only when Sq == Sk with aligned indices.
    """
    if backend == "flash":
        out_BHSD, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
            _bhsd(q_BSHD), _bhsd(k_BSHD), _bhsd(v_BSHD), 0.0, causal, False, scale=scale
        )
    else:
        out_BHSD, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            _bhsd(q_BSHD), _bhsd(k_BSHD), _bhsd(v_BSHD), None, True, 0.0, causal, False, scale=scale
        )
    return out_BHSD.transpose(1, 2).float(), _lse_BHS(lse, q_BSHD.shape[1])


def fused_backward(
    backend: str,
    dout_BSHD: torch.Tensor,
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    out_BSHD: torch.Tensor,
    lse_BHS: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pair's ``(dq, dk, dv)`` in the input dtype (dk/dv with q's head count); no communication.

    ``out_BSHD`` (input dtype) and ``lse_BHS`` (fp32) are the GLOBAL output and LSE of these query rows, so
    the result is this pair's exact share of the full gradient. ``dout_BSHD`` must share ``out_BSHD``'s strides.
    """
    seq_q, seq_k = q_BSHD.shape[1], k_BSHD.shape[1]
    rng = _unused_rng(q_BSHD.device)
    args = (_bhsd(dout_BSHD), _bhsd(q_BSHD), _bhsd(k_BSHD), _bhsd(v_BSHD), _bhsd(out_BSHD))
    lse = lse_BHS.float().contiguous()
    if backend == "flash":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            *args, lse, None, None, seq_q, seq_k, 0.0, causal, rng, rng, scale=scale
        )
    else:
        lse = lse.unsqueeze(-1) if _CUDNN_LSE_KEEPS_LAST_DIM else lse
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            *args, lse, rng, rng, None, None, None, seq_q, seq_k, 0.0, causal, scale=scale
        )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
