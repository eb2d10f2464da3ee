"""DeepSpeed checkpoints (format ``deepspeed``) ⇄ neutral form. Model weights only.

**Conversion is model-only.** Optimizer state (Adam moments, ZeRO's partitioned fp32 optimizer state, loss
scaler, LR scheduler, step counters) is never converted across formats: the reader takes the weights, the
writer writes a checkpoint that DeepSpeed loads with ``engine.load_checkpoint(dir, load_module_only=True)``.

Layout DeepSpeed writes (``engine.save_checkpoint(save_dir, tag)``, ZeRO stage 0–2, no pipeline/tensor
parallelism)::

    save_dir/latest                                          # the tag, e.g. "global_step2"
    save_dir/<tag>/mp_rank_00_model_states.pt                # "module" (full module state dict), "param_shapes",
                                                             # "buffer_names", "ds_config", "dp_world_size", ...
    save_dir/<tag>/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   # ZeRO-1/2: rank r's flat fp32 partition
    save_dir/<tag>/layer_<l>_expert_<e>_mp_rank_00_model_states.pt      # DeepSpeed-MoE only: one file per expert

:class:`DeepSpeedReader` reads:

- **ZeRO-1/2 checkpoints of a plain module** (sparsetron's ``Transformer`` under ``deepspeed.initialize``): the
  weights are the fp32 master weights, reassembled from every data-parallel rank's optimizer partition by
  DeepSpeed's own ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (so a checkpoint
  trained in bf16/fp16 converts at fp32). The module's names are sparsetron's canonical names, after stripping
  one common wrapper prefix if the module was wrapped (e.g. ``module.``); the mapping is otherwise the identity.
- **ZeRO stage 0 / module-only checkpoints** (including :class:`DeepSpeedWriter`'s output): the ``module``
  entry of ``mp_rank_00_model_states.pt``, at the dtype it was saved in.
- **DeepSpeed-MoE models** (``deepspeed.moe.layer.MoE`` inside ``layers.<i>.moe``, expert-parallel): the
  non-expert weights come from ``module`` in ``mp_rank_00_model_states.pt`` and each expert's weights from
  its ``layer_<l>_expert_<e>_mp_rank_00_model_states.pt`` file (the names DeepSpeed's
  ``DeepSpeedEngine._get_expert_ckpt_name`` gives; ``<e>`` is the global expert id). The gate
  ``…deepspeed_moe.gate.wg.weight`` ``[E, D]`` becomes ``layers.<i>.moe.router.weight`` and the experts are
  stacked on the global expert axis. Each expert module must hold its slice of sparsetron's stacked tensors as
  parameters named ``w_gate_up`` ``[D, 2F]`` and ``w_down`` ``[F, D]`` (:data:`DS_MOE_EXPERT_PARAMS`). These
  weights are the module (bit16 when trained in bf16/fp16) weights, not the fp32 master: DeepSpeed's
  ``zero_to_fp32`` cannot reassemble expert-parallel partitions.

ZeRO-3 checkpoints (``zero_pp_rank_*_mp_rank_00_model_states.pt``) are refused with a ConversionError. Every
missing file (``latest``, the model-states file, a rank's optimizer partition, an expert file), missing or
unknown key and wrong shape is a ConversionError naming the file and the key.

:class:`DeepSpeedWriter` writes the **module-states layout only** — ``latest`` and
``<tag>/mp_rank_00_model_states.pt`` holding ``module`` (every canonical tensor, the dtype it arrives in),
``param_shapes`` (one group, canonical order), ``buffer_names`` (empty), ``frozen_param_shapes``,
``shared_params``, ``dp_world_size``/``mp_world_size`` = 1, ``ds_version`` and a ``ds_config`` recording
ZeRO stage 0 — and no ``*_optim_states.pt`` files: a genuine ZeRO layout needs the optimizer's partitioning of a
live engine. DeepSpeed loads it into an engine of the same model (any ZeRO stage 0–2, any data-parallel
size) with ``engine.load_checkpoint(dir, load_module_only=True)``: the engine loads ``module`` with
``load_state_dict`` and then refreshes ZeRO's fp32 partitions from the loaded weights
(``optimizer.refresh_fp32_params``). Loading it *with* optimizer state fails, by design.

With ``deepspeed_moe_module`` set, the writer targets the DeepSpeed-MoE model instead (the reader's mapping run
backwards): ``layers.<i>.moe.router.weight`` becomes ``layers.<i>.moe.<deepspeed_moe_module>.deepspeed_moe.gate
.wg.weight`` in ``module``, each expert ``e``'s slices of the stacked tensors go to
``layer_<i>_expert_<e>_mp_rank_00_model_states.pt`` under ``….deepspeed_moe.experts.deepspeed_experts.<e>.
{w_gate_up,w_down}``, and ``num_experts`` is the per-layer list DeepSpeed checks to choose this layout. An engine
of any expert-parallel size loads it with ``load_module_only=True``: each rank reads its own experts' files
(``DeepSpeedEngine.load_moe_state_dict``).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from sparsetron.checkpoint.convert.neutral import (
    ConversionError,
    TensorGroup,
    atomic_directory,
    check_group,
    expected_specs,
    group_names,
    group_of,
    tensor_hash,
    write_manifest,
)
from sparsetron.config import ModelConfig

FORMAT = "deepspeed"
#: The tag :class:`DeepSpeedWriter` saves under (``<out>/latest`` names it).
DEFAULT_TAG = "sparsetron"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"
ZERO3_REFUSAL = (
    "{file}: a ZeRO stage 3 checkpoint, which this reader does not support; consolidate it first with "
    "DeepSpeed's zero_to_fp32.py, load that state dict into a ZeRO stage 0-2 engine and save again"
)
#: Parameter names of one DeepSpeed-MoE expert module, mapped to sparsetron's stacked expert tensors.
DS_MOE_EXPERT_PARAMS = {"w_gate_up": "experts.w_gate_up", "w_down": "experts.w_down"}

_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")
_DS_MOE_KEY = re.compile(r"((layers\.\d+\.moe)\.(?:.+\.)?deepspeed_moe)\.(.+)")
_DS_EXPERT_KEY = re.compile(r"experts\.deepspeed_experts\.(\d+)\.(.+)")


def _deepspeed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found; the DeepSpeed checkpoint is incomplete")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file is a conversion error naming it
        raise ConversionError(f"{path}: cannot be read as a torch file ({exc})") from exc
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a DeepSpeed state dict")
    return state


def _wrapper_prefix(module: dict[str, torch.Tensor]) -> str:
    """The prefix before ``embed.weight`` when exactly one key ends with it and every key shares it, else ""."""
    anchors = [k for k in module if k == "embed.weight" or k.endswith(".embed.weight")]
    if len(anchors) != 1 or anchors[0] == "embed.weight":
        return ""
    prefix = anchors[0][: -len("embed.weight")]
    return prefix if all(k.startswith(prefix) for k in module) else ""


class DeepSpeedReader:
    """A DeepSpeed checkpoint of ``model_cfg``'s model, read as neutral groups (model weights only; see the
    module docstring for what is read from where).

    ``path`` is the ``save_dir`` given to ``engine.save_checkpoint`` (``tag`` defaults to the one its
    ``latest`` file names) or a tag directory itself. DeepSpeed's ZeRO partitions are flat vectors spanning the
    whole model, so the first :meth:`groups` call assembles every tensor once (the model's size in memory);
    groups are then handed out one at a time.
    """

    format = FORMAT

    def __init__(self, path: str | Path, model_cfg: ModelConfig, tag: str | None = None) -> None:
        path = Path(path)
        if tag is None and (path / MODEL_STATES_FILE).is_file() and not (path / "latest").is_file():
            path, tag = path.parent, path.name
        if tag is None:
            latest = path / "latest"
            if not latest.is_file():
                raise ConversionError(
                    f"{latest}: not found; pass the directory given to engine.save_checkpoint, a tag directory, "
                    "or the tag explicitly"
                )
            tag = latest.read_text().strip()
        self.path, self.tag, self.cfg = path, tag, model_cfg
        self.ckpt_dir = path / tag
        self.model_states_path = self.ckpt_dir / MODEL_STATES_FILE
        if not self.model_states_path.exists() and (self.ckpt_dir / ZERO3_MODEL_STATES_FILE).is_file():
            raise ConversionError(ZERO3_REFUSAL.format(file=self.ckpt_dir / ZERO3_MODEL_STATES_FILE))
        self._model_states = _load(self.model_states_path)
        if "module" not in self._model_states:
            raise ConversionError(
                f"{self.model_states_path}: has no key 'module'; not a DeepSpeed model-states file"
            )
        ds_config = self._model_states.get("ds_config") or {}
        if "zero_optimization" in ds_config:
            self.zero_stage = int((ds_config["zero_optimization"] or {}).get("stage", 0))
        else:  # a checkpoint without its config: ZeRO-1/2 if it has optimizer partitions (same reassembly)
            self.zero_stage = 2 if any(self.ckpt_dir.glob("*zero_pp_rank_*_optim_states.pt")) else 0
        self.expert_files = sorted(
            (p for p in self.ckpt_dir.iterdir() if _EXPERT_FILE.fullmatch(p.name)),
            key=lambda p: tuple(int(x) for x in _EXPERT_FILE.fullmatch(p.name).groups()),
        )
        #: A prefix every module key carries when the model was wrapped (``module.`` …), found from the
        #: embedding's key; "" for sparsetron's Transformer given to deepspeed.initialize directly.
        self._wrapper = _wrapper_prefix(self._model_states["module"])
        self.is_deepspeed_moe = bool(self.expert_files) or any(
            ".deepspeed_moe." in k for k in self._model_states["module"]
        )
        if self.zero_stage == 3:
            raise ConversionError(ZERO3_REFUSAL.format(file=self.model_states_path))
        self.weights_source = (
            "zero_to_fp32 (fp32 master partitions)"
            if self.zero_stage in (1, 2) and not self.is_deepspeed_moe
            else "module states"
        )
        self._state: dict[str, torch.Tensor] | None = None

    def model_config(self) -> ModelConfig:
        return self.cfg

    def describe(self) -> dict:
        return {
            "format": FORMAT,
            "path": str(self.path),
            "tag": self.tag,
            "deepspeed_version": self._model_states.get("ds_version"),
            "zero_stage": self.zero_stage,
            "dp_world_size": self._model_states.get("dp_world_size"),
            "deepspeed_moe": self.is_deepspeed_moe,
            "weights": self.weights_source,
            "model_only": True,
        }

    # -- reading ------------------------------------------------------------------------------------------------

    def optim_files(self) -> list[Path]:
        """The ZeRO-1/2 optimizer partition files this checkpoint needs (one per data-parallel rank);
        ConversionError naming the first that is missing."""
        world = int(self._model_states.get("dp_world_size") or 1)
        files = []
        for r in range(world):
            # DeepSpeed prefixes the name with "bf16_" when the engine ran in bf16.
            names = [
                f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
            ]
            found = [self.ckpt_dir / n for n in names if (self.ckpt_dir / n).is_file()]
            if not found:
                raise ConversionError(
                    f"{self.ckpt_dir / names[0]}: missing; this ZeRO-{self.zero_stage} checkpoint was saved by "
                    f"{world} data-parallel ranks and every rank's optimizer partition holds part of the weights. "
                    "Copy the whole tag directory"
                )
            files.append(found[0])
        return files

    def _zero_fp32_state(self) -> dict[str, torch.Tensor]:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as exc:
            raise ConversionError(
                f"{self.ckpt_dir}: reading a ZeRO-{self.zero_stage} checkpoint needs DeepSpeed's zero_to_fp32 "
                f"({exc}); install it: pip install -e '.[deepspeed]'"
            ) from exc
        self.optim_files()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
                return get_fp32_state_dict_from_zero_checkpoint(str(self.path), tag=self.tag)
        except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
            raise ConversionError(
                f"{self.ckpt_dir}: DeepSpeed's zero_to_fp32 could not reassemble the ZeRO partitions ({exc})"
            ) from exc

    def _deepspeed_moe_state(self, module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical tensors of a DeepSpeed-MoE module: gate → router, per-expert files stacked on [E, ...]."""
        out: dict[str, torch.Tensor] = {}
        ds_prefixes: dict[
            str, str
        ] = {}  # layers.<i>.moe -> the DeepSpeed MoE's layers.<i>.moe[.<attr>].deepspeed_moe
        for key, value in module.items():
            m = _DS_MOE_KEY.fullmatch(key)
            if m is None:
                out[key] = value
                continue
            ds_prefix, prefix, rest = m.groups()
            ds_prefixes.setdefault(prefix, ds_prefix)
            if rest == "gate.wg.weight":
                out[f"{prefix}.router.weight"] = value
            elif not rest.startswith("experts."):
                raise ConversionError(
                    f"{self.model_states_path}: key {key}: DeepSpeed-MoE tensor with no sparsetron counterpart"
                )
        # DeepSpeed numbers MoE layers (the <l> of layer_<l>_expert_<e>) in module order.
        moe_prefixes = sorted(ds_prefixes, key=lambda p: int(p.split(".")[1]))
        experts: dict[str, dict[int, torch.Tensor]] = {}
        for path in self.expert_files:
            layer_id, expert_id = (int(x) for x in _EXPERT_FILE.fullmatch(path.name).groups())
            if layer_id >= len(moe_prefixes):
                raise ConversionError(
                    f"{path}: MoE layer {layer_id} does not exist in {self.model_states_path}"
                )
            prefix = moe_prefixes[layer_id]
            for key, value in self._strip(_load(path), path).items():
                m = _DS_MOE_KEY.fullmatch(key)
                e = _DS_EXPERT_KEY.fullmatch(m.group(3)) if m else None
                if m is None or e is None or m.group(2) != prefix or int(e.group(1)) != expert_id:
                    raise ConversionError(
                        f"{path}: key {key} is not expert {expert_id} of {ds_prefixes[prefix]}.experts"
                    )
                if e.group(2) not in DS_MOE_EXPERT_PARAMS:
                    raise ConversionError(
                        f"{path}: key {key}: expert parameter {e.group(2)!r} is not one of "
                        f"{sorted(DS_MOE_EXPERT_PARAMS)} (sparsetron's SwiGLU expert slices)"
                    )
                experts.setdefault(f"{prefix}.{DS_MOE_EXPERT_PARAMS[e.group(2)]}", {})[expert_id] = value
        for layer_id, prefix in enumerate(moe_prefixes):
            for param, canonical in DS_MOE_EXPERT_PARAMS.items():
                name = f"{prefix}.{canonical}"
                got = experts.get(name, {})
                missing = [e for e in range(self.cfg.num_experts) if e not in got]
                if missing:
                    raise ConversionError(
                        f"{self.ckpt_dir / f'layer_{layer_id}_expert_{missing[0]}_mp_rank_00_model_states.pt'}: "
                        f"missing, or lacks key {self._wrapper}{ds_prefixes[prefix]}.experts.deepspeed_experts."
                        f"{missing[0]}.{param}; the checkpoint needs all {self.cfg.num_experts} experts' files"
                    )
                extra = sorted(set(got) - set(range(self.cfg.num_experts)))
                shapes = {tuple(t.shape) for t in got.values()}
                if extra or len(shapes) != 1:
                    raise ConversionError(
                        f"{self.ckpt_dir}: {name}: experts have shapes {sorted(shapes)} and ids {sorted(got)}; "
                        f"the model config needs experts 0..{self.cfg.num_experts - 1} of one shape"
                    )
                out[name] = torch.stack([got[e] for e in range(self.cfg.num_experts)])
        return out

    def _strip(self, state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
        """``state`` without the module's wrapper prefix (:attr:`_wrapper`)."""
        if not self._wrapper:
            return dict(state)
        outside = [k for k in state if not k.startswith(self._wrapper)]
        if outside:
            raise ConversionError(
                f"{source}: key {outside[0]} lies outside the wrapped module {self._wrapper!r}"
            )
        return {k[len(self._wrapper) :]: v for k, v in state.items()}

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint under its canonical name (loaded once, then cached)."""
        if self._state is None:
            module = self._strip(self._model_states["module"], self.model_states_path)
            if self.is_deepspeed_moe:
                self._state = self._deepspeed_moe_state(module)
            elif self.zero_stage in (1, 2):
                self._state = self._strip(self._zero_fp32_state(), self.ckpt_dir)
            else:
                self._state = module
            self._model_states["module"] = None  # the state above holds what is needed
        return self._state

    def groups(self) -> Iterator[TensorGroup]:
        state = self.state()
        specs = expected_specs(self.cfg)
        unknown = sorted(k for k in state if k not in specs)
        if unknown:
            raise ConversionError(
                f"{self.model_states_path}: key {unknown[0]} (and {len(unknown) - 1} more) has no sparsetron "
                "counterpart; the checkpoint is not of this model config"
            )
        for name in group_names(self.cfg):
            group = TensorGroup(
                name, {k: state[k].detach().contiguous() for k in specs if group_of(k) == name and k in state}
            )
            check_group(self.cfg, group, str(self.model_states_path))
            yield group


class DeepSpeedWriter:
    """Writes neutral groups as a DeepSpeed module-states checkpoint (``latest`` + ``<tag>/mp_rank_00_model_states.pt``,
    no optimizer files) that ``engine.load_checkpoint(path, load_module_only=True)`` loads into sparsetron's
    ``Transformer`` under ``deepspeed.initialize``; see the module docstring. Model-only: no optimizer state.

    ``deepspeed_moe_module``: None for sparsetron's own model; for a model whose ``layers.<i>.moe`` holds a
    ``deepspeed.moe.layer.MoE`` as attribute ``<name>``, that name ("" when ``layers.<i>.moe`` is the
    DeepSpeed MoE itself); the experts are then written as DeepSpeed's per-expert files.

    DeepSpeed keeps the whole module in one file, so the writer holds every tensor until it saves.
    """

    format = FORMAT

    def __init__(
        self, path: str | Path, tag: str = DEFAULT_TAG, deepspeed_moe_module: str | None = None
    ) -> None:
        self.path, self.tag = Path(path), tag
        self.deepspeed_moe_module = deepspeed_moe_module

    def _deepspeed_moe_layout(
        self, cfg: ModelConfig, module: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """Split canonical tensors into a DeepSpeed-MoE module (router → gate) and per-expert files."""
        sub = f"{self.deepspeed_moe_module}." if self.deepspeed_moe_module else ""
        out: dict[str, torch.Tensor] = OrderedDict()
        files: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(cfg.n_layers):
            for e in range(cfg.num_experts):
                files[f"layer_{i}_expert_{e}_mp_rank_00_model_states.pt"] = {}
        for key, value in module.items():
            if not (key.startswith("layers.") and key.split(".")[2] == "moe"):
                out[key] = value
                continue
            layer = int(key.split(".")[1])
            ds = f"layers.{layer}.moe.{sub}deepspeed_moe"
            rest = key[len(f"layers.{layer}.moe.") :]
            if rest == "router.weight":
                out[f"{ds}.gate.wg.weight"] = value
                continue
            param = {v: k for k, v in DS_MOE_EXPERT_PARAMS.items()}.get(rest)
            if param is None:
                raise ConversionError(
                    f"neutral tensor {key} has no DeepSpeed-MoE counterpart (a MoE layer there holds a gate and "
                    f"experts {sorted(DS_MOE_EXPERT_PARAMS)} only)"
                )
            for e in range(cfg.num_experts):
                files[f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"][
                    f"{ds}.experts.deepspeed_experts.{e}.{param}"
                ] = value[e].clone()
        return out, files

    def write(self, cfg: ModelConfig, groups: Iterable[TensorGroup], manifest: dict) -> dict[str, str]:
        specs = expected_specs(cfg)
        module: dict[str, torch.Tensor] = {}
        seen: list[str] = []
        for group in groups:
            check_group(cfg, group, f"neutral group {group.name}")
            seen.append(group.name)
            for key, tensor in group.tensors.items():
                module[key] = tensor.detach().cpu().contiguous().clone()
        if seen != group_names(cfg):
            raise ConversionError(
                f"neutral input has groups {seen}, the model config needs {group_names(cfg)}"
            )
        module = OrderedDict((k, module[k]) for k in specs)  # the module's own parameter order
        hashes = {k: tensor_hash(v) for k, v in module.items()}
        version = _deepspeed_version()
        expert_files: dict[str, dict[str, torch.Tensor]] = {}
        if self.deepspeed_moe_module is not None:
            module, expert_files = self._deepspeed_moe_layout(cfg, module)
        state = {
            "module": module,
            "buffer_names": [],
            "optimizer": None,
            "param_shapes": [OrderedDict((k, v.shape) for k, v in module.items())],
            "frozen_param_shapes": OrderedDict(),
            "shared_params": {},
            "frozen_param_fragments": OrderedDict(),
            "lr_scheduler": None,
            "data_sampler": None,
            "random_ltd": None,
            "skipped_steps": 0,
            "global_steps": 0,
            "global_samples": 0,
            "dp_world_size": 1,
            "mp_world_size": 1,
            "ds_config": {"zero_optimization": {"stage": 0}},
            "ds_version": version,
        }
        if self.deepspeed_moe_module is not None:
            state["num_experts"] = [
                cfg.num_experts
            ] * cfg.n_layers  # a list: DeepSpeed's per-layer expert files
        with atomic_directory(self.path) as scratch:
            (scratch / self.tag).mkdir()
            torch.save(state, scratch / self.tag / MODEL_STATES_FILE)
            for name, expert_state in expert_files.items():
                torch.save(expert_state, scratch / self.tag / name)
            (scratch / "latest").write_text(self.tag)
            record = {
                **manifest,
                "target": {
                    "format": FORMAT,
                    "tag": self.tag,
                    "layout": "module states only (load with engine.load_checkpoint(..., load_module_only=True))",
                    "deepspeed_moe_module": self.deepspeed_moe_module,
                    "deepspeed_version": version,
                    "model_only": True,
                },
            }
            write_manifest(scratch, record, hashes)
        return hashes
