"""SparseLoCo's compressor: error feedback, chunked top-k, low-bit quantisation with a per-tensor codebook.

Per tensor and outer step: ``e ← β·e + Δ`` (the error buffer, fp32, on the tensor's device); ``e`` is split
into chunks of ``C`` elements (64×64 tiles when the last two dimensions are multiples of 64, so a chunk is a
spatial block of one matrix — of one expert for stacked experts — else consecutive elements); each chunk keeps
its ``k`` largest-magnitude entries; their values are quantised to ``bits`` bits against a codebook fitted to
this tensor's selected values (or sent as bf16 / fp32 with ``bits`` 16 / 32); and what is sent — the
dequantised values at the kept positions — is subtracted from ``e``, so the error keeps everything not sent,
quantisation error included.

The error buffer lives in chunk layout ``[num_chunks, C]``, so a step reads ``Δ`` once (through a strided view
that does the tiling), runs top-k on contiguous rows, and subtracts what was sent with a scatter over the
``k`` kept entries: no dense temporaries of the tensor's size. Everything here is device-side torch; nothing
communicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsetron.kernels.chunk_topk import fused_ef_topk, kernel_applies

#: Side of the square tiles 2-D tensors are chunked into when both dimensions allow it (64×64 = 4096).
TILE = 64


@dataclass(frozen=True)
class Chunking:
    """How a tensor of ``shape`` maps onto ``[num_chunks, chunk]`` rows (and back).

    ``tiled``: the tensor, seen as a matrix ``[numel / shape[-1], shape[-1]]``, is cut into ``TILE×TILE`` tiles
    (``chunk == TILE²``); otherwise the flattened tensor is cut into consecutive runs of ``chunk`` elements, the
    last one zero-padded.
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
    tiled = (
        chunk == TILE * TILE
        and len(shape) >= 2
        and shape[-2] % TILE == 0
        and shape[-1] % TILE == 0
        and math.prod(shape) > 0
    )
    return Chunking(tuple(shape), chunk, tiled)


def _tile_view(x: torch.Tensor, chunking: Chunking) -> torch.Tensor:
    """``x`` (of ``chunking.shape``) as ``[rows/64, cols/64, 64, 64]`` tiles: a strided view, no copy."""
    cols = chunking.shape[-1]
    rows = chunking.numel // cols
    return x.reshape(rows // TILE, TILE, cols // TILE, TILE).permute(0, 2, 1, 3)


def to_chunks(x: torch.Tensor, chunking: Chunking) -> torch.Tensor:
    """``x`` as ``[num_chunks, chunk]`` (a copy; zero padding at the end when not tiled)."""
    if chunking.tiled:
        return _tile_view(x, chunking).reshape(-1, chunking.chunk)
    flat = x.reshape(-1)
    padded = flat.new_zeros(chunking.num_chunks * chunking.chunk)
    padded[: flat.numel()] = flat
    return padded.view(-1, chunking.chunk)


def add_chunked_(x_NC: torch.Tensor, y: torch.Tensor, chunking: Chunking) -> torch.Tensor:
    """``x_NC += y`` where ``y`` has ``chunking.shape`` (any float dtype): reads ``y`` once, in place."""
    if chunking.tiled:
        cols = chunking.shape[-1]
        x_NC.view(chunking.numel // cols // TILE, cols // TILE, TILE, TILE).add_(_tile_view(y, chunking))
    else:
        x_NC.view(-1)[: chunking.numel].add_(y.reshape(-1))
    return x_NC


def from_chunks(x_NC: torch.Tensor, chunking: Chunking) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: a tensor of ``chunking.shape``."""
    if chunking.tiled:
        cols = chunking.shape[-1]
        rows = chunking.numel // cols
        tiles = x_NC.reshape(rows // TILE, cols // TILE, TILE, TILE).permute(0, 2, 1, 3)
        return tiles.reshape(chunking.shape)
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

    Code ``c`` = ``sign_bit << (bits − 1) | bin``: the sorted magnitudes are cut into ``2**(bits−1)`` equally
    populated segments (bins by quantile) and each bin's level is the mean magnitude of its segment, so the
    codebook minimises the squared error for that binning (one Lloyd step from quantile bins). Segment sums
    come from one cumulative sum over the sorted magnitudes: no atomics (a scatter-add into 2 bins from
    millions of values serialises on the GPU). :func:`fit_codebooks` fits many tensors' codebooks at once.
    """
    return fit_codebooks(values.reshape(1, -1), bits)[0]


def fit_codebooks(values_TM: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 ``[T, 2**bits]``: :func:`fit_codebook` of every row of ``values_TM`` (one sort for all rows)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be between 1 and 8 (train.dp.bits; the reference uses 2).")
    magnitude_TM = values_TM.detach().abs().float()
    rows, count = magnitude_TM.shape
    bins = 1 << (bits - 1)
    if count == 0:
        return magnitude_TM.new_zeros(rows, 2 * bins)
    ordered = magnitude_TM.sort(dim=1).values.double().cumsum(dim=1)
    cumulative_TM = torch.cat([ordered.new_zeros(rows, 1), ordered], dim=1)
    bounds = [i * count // bins for i in range(bins + 1)]
    sums_TB = cumulative_TM[:, bounds[1:]] - cumulative_TM[:, bounds[:-1]]
    sizes = [max(bounds[i + 1] - bounds[i], 1) for i in range(bins)]
    levels_TB = (sums_TB / sums_TB.new_tensor(sizes)).float()
    # An empty bin (fewer values than bins) has level 0; it takes its lower neighbour's so levels ascend.
    levels_TB = torch.cummax(levels_TB, dim=1).values
    return torch.cat([levels_TB, -levels_TB], dim=1)


def quantize(values: torch.Tensor, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``values`` against a codebook from :func:`fit_codebook` (nearest magnitude level, sign bit).

    ``codebook`` is ``[2**bits]``, or ``[T, 2**bits]`` for ``values`` of shape ``[T, …]`` (one per row).
    """
    bins = 1 << (bits - 1)
    levels = codebook[..., :bins]
    if codebook.dim() == 2:  # per leading row: broadcast over the remaining dims
        levels = levels.view(levels.shape[0], *([1] * (values.dim() - 1)), bins)
    magnitude = values.detach().abs().float()
    # Nearest level by magnitude: levels are ascending (bins by increasing quantile).
    nearest = (magnitude.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    negative = (values < 0).to(torch.uint8)
    return (negative << (bits - 1) | nearest.to(torch.uint8)).to(torch.uint8)


def dequantize(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """fp32 values of ``codes`` (any shape) against ``[2**bits]``, or ``[T, 2**bits]`` per leading row."""
    if codebook.dim() == 2:
        flat = torch.gather(codebook, 1, codes.reshape(codes.shape[0], -1).long())
        return flat.view(codes.shape)
    return codebook[codes.long()]


#: ``bits`` that send the selected values themselves: their dtype on the wire.
RAW_VALUE_DTYPES = {16: torch.bfloat16, 32: torch.float32}


def check_bits(bits: int) -> None:
    """Raise if ``bits`` is neither a code width (1–8) nor a raw value width (16, 32)."""
    if not (isinstance(bits, int) and (1 <= bits <= 8 or bits in RAW_VALUE_DTYPES)):
        raise ValueError(
            f"bits={bits!r} must be 1–8 (quantised against a per-tensor codebook; the reference uses 2) or "
            "16 / 32 (values sent as bf16 / fp32) (train.dp.bits)."
        )


@dataclass
class CompressedChunks:
    """What one tensor sends: per chunk the kept in-chunk indices and their codes, plus the codebook.

    ``codes_NK`` are uint8 codes into ``codebook`` for ``bits`` ≤ 8, or the values themselves (bf16 / fp32,
    empty codebook) for ``bits`` 16 / 32.
    """

    chunking: Chunking
    indices_NK: torch.Tensor
    codes_NK: torch.Tensor
    codebook: torch.Tensor
    bits: int

    def values_NK(self) -> torch.Tensor:
        """fp32 ``[num_chunks, k]``: the values the receivers reconstruct."""
        if self.bits in RAW_VALUE_DTYPES:
            return self.codes_NK.float()
        return dequantize(self.codes_NK, self.codebook)

    def dense_chunks(self) -> torch.Tensor:
        """The transmitted tensor in chunk layout, fp32 ``[num_chunks, chunk]`` (zeros where nothing was sent)."""
        rows = torch.zeros(
            self.chunking.num_chunks, self.chunking.chunk, dtype=torch.float32, device=self.codes_NK.device
        )
        return rows.scatter_(1, self.indices_NK, self.values_NK())

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The transmitted tensor, dense, of ``chunking.shape`` (zeros where nothing was sent)."""
        return from_chunks(self.dense_chunks(), self.chunking).to(dtype)


class ErrorFeedback:
    """Per-tensor error buffers and the compression step of SparseLoCo (one instance per replica).

    ``compress(name, delta)`` folds ``delta`` into the error (``e ← decay·e + delta``), selects and quantises,
    subtracts what is sent from ``e`` and returns it. Buffers are fp32 in chunk layout on ``delta``'s device,
    created on first use; :meth:`state_dict` / :meth:`load_state_dict` give and take them in the tensors'
    own shapes.
    """

    def __init__(self, *, chunk: int = 4096, topk: int = 64, bits: int = 2, decay: float = 0.95) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"error decay β={decay} must be within [0, 1] (train.dp.error_decay).")
        check_bits(bits)
        chunking_for((1,), chunk)  # validates chunk
        self.chunk, self.topk, self.bits, self.decay = chunk, topk, bits, decay
        self.errors: dict[str, tuple[Chunking, torch.Tensor]] = {}

    def buffer(self, name: str, delta: torch.Tensor) -> tuple[Chunking, torch.Tensor]:
        """``(chunking, error_NC)`` of tensor ``name``, created (zeros) for ``delta``'s shape and device."""
        found = self.errors.get(name)
        chunking = chunking_for(tuple(delta.shape), self.chunk)
        if found is None:
            error_NC = torch.zeros(
                chunking.num_chunks, chunking.chunk, dtype=torch.float32, device=delta.device
            )
            found = self.errors[name] = (chunking, error_NC)
        elif found[0] != chunking:
            raise ValueError(
                f"tensor {name!r}: delta of shape {tuple(delta.shape)} but its error buffer has shape "
                f"{found[0].shape}; the model changed since the buffers were made (reset them)."
            )
        return found

    @torch.no_grad()
    def compress(self, name: str, delta: torch.Tensor) -> CompressedChunks:
        """Compress ``delta`` (any float dtype, any shape) for tensor ``name``; updates its error buffer."""
        return self.compress_many({name: delta})[name]

    @torch.no_grad()
    def compress_many(self, deltas: dict[str, torch.Tensor]) -> dict[str, CompressedChunks]:
        """:meth:`compress` of several tensors. Tensors with the same chunk geometry share one codebook fit,
        one quantisation and one gather (each tensor keeps its own codebook), which on a GPU turns a few
        dozen kernel launches per tensor into a few per group."""
        groups: dict[tuple, list[str]] = {}
        for name, delta in deltas.items():
            chunking, _ = self.buffer(name, delta)
            groups.setdefault((chunking.num_chunks, chunking.chunk, delta.device), []).append(name)
        sent: dict[str, CompressedChunks] = {}
        for (rows, chunk, device), names in groups.items():
            k = min(self.topk, chunk)
            indices_TNK = torch.empty(len(names), rows, k, dtype=torch.int64, device=device)
            values_TNK = torch.empty(len(names), rows, k, dtype=torch.float32, device=device)
            for t, name in enumerate(names):
                indices_TNK[t], values_TNK[t] = self._select(name, deltas[name], k)
            if self.bits in RAW_VALUE_DTYPES:
                codebook_TL = torch.zeros(len(names), 0, dtype=torch.float32, device=device)
                codes_TNK = values_TNK.to(RAW_VALUE_DTYPES[self.bits])
            else:
                codebook_TL = fit_codebooks(values_TNK.view(len(names), -1), self.bits)
                codes_TNK = quantize(values_TNK, codebook_TL, self.bits)
            for t, name in enumerate(names):
                chunking, error_NC = self.errors[name]
                item = CompressedChunks(chunking, indices_TNK[t], codes_TNK[t], codebook_TL[t], self.bits)
                error_NC.scatter_add_(1, item.indices_NK, -item.values_NK())
                sent[name] = item
        return {name: sent[name] for name in deltas}

    def _select(self, name: str, delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold ``delta`` into the error and pick each chunk's top-k: one fused kernel on the GPU."""
        chunking, error_NC = self.errors[name]
        if kernel_applies(error_NC):
            return fused_ef_topk(error_NC, delta, self.decay, k, chunking.tiled)
        add_chunked_(error_NC.mul_(self.decay), delta, chunking)
        return topk_per_chunk(error_NC, k)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Error buffers by tensor name, each in its tensor's shape (fp32)."""
        return {name: from_chunks(error_NC, chunking) for name, (chunking, error_NC) in self.errors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the buffers with ``state`` (tensor-shaped, as :meth:`state_dict` gives them)."""
        self.errors = {}
        for name, tensor in state.items():
            chunking = chunking_for(tuple(tensor.shape), self.chunk)
            error_NC = torch.zeros(
                chunking.num_chunks, chunking.chunk, dtype=torch.float32, device=tensor.device
            )
            self.errors[name] = (chunking, add_chunked_(error_NC, tensor.float(), chunking))
