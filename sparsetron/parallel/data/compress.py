"""SparseLoCo's compressor: error feedback, chunked top-k, low-bit quantisation with a per-tensor codebook.

Per tensor and outer step: ``e ← β·e + Δ`` (the error buffer, fp32, on the tensor's device); ``e`` is split
into chunks of ``C`` elements (64×64 tiles for matrices whose sides are multiples of 64, so a chunk is a
spatial block, else consecutive elements); each chunk keeps its ``k`` largest-magnitude entries; their values
are quantised to ``bits`` bits against a codebook fitted to this tensor's selected values; and what is sent —
the dequantised values at the kept positions — is subtracted from ``e``, so the error keeps everything not
sent, quantisation error included. Everything here is device-side torch; nothing communicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Side of the square tiles 2-D tensors are chunked into when both dimensions allow it (64×64 = 4096).
TILE = 64


@dataclass(frozen=True)
class Chunking:
    """How a tensor of ``shape`` maps onto ``[num_chunks, chunk]`` rows (and back).

    ``tiled``: 2-D tensor cut into ``TILE×TILE`` tiles (``chunk == TILE²``); otherwise the flattened tensor is
    cut into consecutive runs of ``chunk`` elements, the last one zero-padded.
    """

    shape: tuple[int, ...]
    chunk: int
    tiled: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.numel / self.chunk) if self.numel else 0


def chunking_for(shape: tuple[int, ...], chunk: int) -> Chunking:
    """The chunking of a tensor of ``shape`` for chunks of ``chunk`` elements (tiles when ``chunk == 64²``)."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be ≥ 1 (train.dp.chunk; the reference uses 4096).")
    tiled = chunk == TILE * TILE and len(shape) == 2 and shape[0] % TILE == 0 and shape[1] % TILE == 0
    return Chunking(tuple(shape), chunk, tiled)


def to_chunks(x: torch.Tensor, chunking: Chunking) -> torch.Tensor:
    """``x`` as ``[num_chunks, chunk]`` (a copy; zero padding at the end when not tiled)."""
    if chunking.tiled:
        rows, cols = chunking.shape
        return (
            x.reshape(rows // TILE, TILE, cols // TILE, TILE).permute(0, 2, 1, 3).reshape(-1, chunking.chunk)
        )
    flat = x.reshape(-1)
    padded = flat.new_zeros(chunking.num_chunks * chunking.chunk)
    padded[: flat.numel()] = flat
    return padded.view(-1, chunking.chunk)


def from_chunks(x_NC: torch.Tensor, chunking: Chunking) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: a tensor of ``chunking.shape``."""
    if chunking.tiled:
        rows, cols = chunking.shape
        return x_NC.reshape(rows // TILE, cols // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(rows, cols)
    return x_NC.reshape(-1)[: chunking.numel].reshape(chunking.shape)


def topk_per_chunk(x_NC: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` largest-magnitude entries: ``(indices_NK int64 sorted ascending, values_NK)``.

    Sorted indices make the wire format's gap coding possible and the result deterministic.
    """
    if not 1 <= k <= x_NC.shape[1]:
        raise ValueError(f"top-k k={k} must be between 1 and the chunk size {x_NC.shape[1]} (train.dp.topk).")
    indices_NK = torch.topk(x_NC.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values
    return indices_NK, x_NC.gather(1, indices_NK)


def fit_codebook(values: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 ``[2**bits]`` levels for ``values``: sign × one magnitude per magnitude bin.

    Code ``c`` = ``sign_bit << (bits − 1) | bin``: the magnitudes are split into ``2**(bits−1)`` equally
    populated bins (quantiles of |v|) and each bin's level is the mean magnitude of its members, so the
    codebook minimises the squared error for that binning (one Lloyd step from quantile bins).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be between 1 and 8 (train.dp.bits; the reference uses 2).")
    magnitude = values.detach().abs().float().reshape(-1)
    bins = 1 << (bits - 1)
    edges = _bin_edges(magnitude, bins)
    bin_of = torch.bucketize(magnitude, edges)
    sums = torch.zeros(bins, dtype=torch.float32, device=values.device).index_add_(0, bin_of, magnitude)
    counts = torch.zeros(bins, dtype=torch.float32, device=values.device).index_add_(
        0, bin_of, torch.ones_like(magnitude)
    )
    levels = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return torch.cat([levels, -levels])


def _bin_edges(magnitude: torch.Tensor, bins: int) -> torch.Tensor:
    """Edges between equally populated bins: midpoints between the sorted magnitudes at each split."""
    count = magnitude.numel()
    if bins == 1 or count < 2:
        return magnitude.new_zeros(0)
    ordered = magnitude.sort().values
    splits = (torch.arange(1, bins, device=magnitude.device) * count // bins).clamp(1, count - 1)
    return (ordered[splits - 1] + ordered[splits]) / 2


def quantize(values: torch.Tensor, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``values`` against a codebook from :func:`fit_codebook` (nearest magnitude level, sign bit)."""
    bins = 1 << (bits - 1)
    levels = codebook[:bins]
    magnitude = values.detach().abs().float()
    # Nearest level by magnitude: levels are ascending (bins by increasing quantile).
    nearest = (magnitude.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    negative = (values < 0).to(torch.uint8)
    return (negative << (bits - 1) | nearest.to(torch.uint8)).to(torch.uint8)


def dequantize(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """fp32 values of ``codes`` (any shape)."""
    return codebook[codes.long()]


@dataclass
class CompressedChunks:
    """What one tensor sends: per chunk the kept in-chunk indices and their codes, plus the codebook."""

    chunking: Chunking
    indices_NK: torch.Tensor
    codes_NK: torch.Tensor
    codebook: torch.Tensor
    bits: int

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The transmitted tensor, dense, of ``chunking.shape`` (zeros where nothing was sent)."""
        rows = torch.zeros(
            self.chunking.num_chunks, self.chunking.chunk, dtype=torch.float32, device=self.codes_NK.device
        )
        rows.scatter_(1, self.indices_NK, dequantize(self.codes_NK, self.codebook))
        return from_chunks(rows, self.chunking).to(dtype)


class ErrorFeedback:
    """Per-tensor error buffers and the compression step of SparseLoCo (one instance per replica).

    ``compress(name, delta)`` folds ``delta`` into the error (``e ← decay·e + delta``), selects and quantises,
    subtracts what is sent from ``e`` and returns it. Buffers are fp32 on ``delta``'s device, created on first
    use; :meth:`state_dict` / :meth:`load_state_dict` checkpoint them.
    """

    def __init__(self, *, chunk: int = 4096, topk: int = 64, bits: int = 2, decay: float = 0.95) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"error decay β={decay} must be within [0, 1] (train.dp.error_decay).")
        self.chunk, self.topk, self.bits, self.decay = chunk, topk, bits, decay
        self.errors: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def compress(self, name: str, delta: torch.Tensor) -> CompressedChunks:
        """Compress ``delta`` (any float dtype, any shape) for tensor ``name``; updates its error buffer."""
        error = self.errors.get(name)
        if error is None:
            error = self.errors[name] = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device)
        elif error.shape != delta.shape:
            raise ValueError(
                f"tensor {name!r}: delta of shape {tuple(delta.shape)} but its error buffer has shape "
                f"{tuple(error.shape)}; the model changed since the buffers were made (reset them)."
            )
        error.mul_(self.decay).add_(delta.float())
        chunking = chunking_for(tuple(delta.shape), self.chunk)
        error_NC = to_chunks(error, chunking)
        k = min(self.topk, chunking.chunk)
        indices_NK, values_NK = topk_per_chunk(error_NC, k)
        codebook = fit_codebook(values_NK, self.bits)
        codes_NK = quantize(values_NK, codebook, self.bits)
        sent = CompressedChunks(chunking, indices_NK, codes_NK, codebook, self.bits)
        error.sub_(sent.dense())
        return sent

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.errors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.errors = {name: tensor.float().clone() for name, tensor in state.items()}
