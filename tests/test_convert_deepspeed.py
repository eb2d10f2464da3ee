"""DeepSpeed ZeRO checkpoints ⇄ neutral form, against checkpoints DeepSpeed itself writes and loads.

One module-scoped fixture trains the tiny MoE model (sparsetron's ``Transformer``, fp32, CPU) for two optimizer
steps under ``deepspeed.initialize`` with ZeRO-2 on 2 gloo ranks (torchrun), saves it with
``engine.save_checkpoint`` and saves rank 0's module ``state_dict`` as the reference. A second one does the same
for a DeepSpeed-MoE variant (each ``layers.<i>.moe`` a ``deepspeed.moe.layer.MoE``, ep=2, experts saved in
DeepSpeed's per-expert files). Written checkpoints are loaded back by DeepSpeed (``load_checkpoint(...,
load_module_only=True)`` into a fresh ZeRO-2 engine on 2 ranks) and compared bit for bit. This file is also the
worker script torchrun runs (``python tests/test_convert_deepspeed.py train|load|train_ds_moe|load_ds_moe ...``).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

WORKER_TIMEOUT_S = 240

#: The tiny model every test here uses (ModelConfig fields).
MODEL = dict(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2, expert_ffn_dim=32
)


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ----------------------------------------------------------------------------------------------------------------
# Worker (runs under torchrun: one process per rank)


def _engine(stage: int):
    import deepspeed

    from sparsetron.config import ModelConfig
    from sparsetron.model import Transformer

    # Skip the JIT build of deepspeed_shm_comm (about 37 s cold); gloo does the communication.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(stage)
    )
    return engine


def _train(save_dir: str, reference: str, stage: int) -> None:
    import torch.nn.functional as F

    engine = _engine(stage)
    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        tokens = torch.randint(0, MODEL["vocab_size"], (2, 16), generator=gen)
        out = engine(tokens[:, :-1])
        loss = F.cross_entropy(out.logits_BSV.reshape(-1, MODEL["vocab_size"]), tokens[:, 1:].reshape(-1))
        engine.backward(loss + out.aux_loss)
        engine.step()
    engine.save_checkpoint(save_dir, tag="step2")
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, reference)
    torch.distributed.barrier()


def _ds_moe_engine():
    """sparsetron's Transformer with each ``layers.<i>.moe`` replaced by a DeepSpeed-MoE layer (experts sharded
    ep=2 over the 2 ranks, SwiGLU experts holding ``w_gate_up``/``w_down`` slices), under ZeRO-2."""
    import deepspeed
    import torch.nn.functional as F
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from torch import nn

    from sparsetron.config import ModelConfig
    from sparsetron.model import Transformer

    class SwiGLUExpert(nn.Module):
        def __init__(self, dim: int, ffn: int) -> None:
            super().__init__()
            self.w_gate_up = nn.Parameter(torch.zeros(dim, 2 * ffn))
            self.w_down = nn.Parameter(torch.zeros(ffn, dim))

        def forward(self, x):
            gate, up = (x @ self.w_gate_up).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ self.w_down

    class DeepSpeedMoEBlock(nn.Module):
        def __init__(self, cfg: ModelConfig) -> None:
            super().__init__()
            expert = SwiGLUExpert(cfg.dim, cfg.expert_ffn_dim)
            self.ds = MoE(cfg.dim, expert, cfg.num_experts, ep_size=2, k=cfg.top_k, min_capacity=64)

        def forward(self, x_BSD):
            out, aux_loss, counts = self.ds(x_BSD)
            zero = x_BSD.new_zeros(())
            stats = types.SimpleNamespace(
                aux_loss=aux_loss, tokens_per_expert_E=counts.float(), dropped=zero, entropy=zero
            )
            return out, stats

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    cfg = ModelConfig(**MODEL)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for i, layer in enumerate(model.layers):
        layer.moe = DeepSpeedMoEBlock(cfg)
        for local, expert in enumerate(layer.moe.ds.deepspeed_moe.experts.deepspeed_experts):
            gen = torch.Generator().manual_seed(1000 * i + 2 * rank + local)  # distinct per global expert
            for p in expert.parameters():
                p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    params = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "p"}
    )
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config(2))
    return engine


def _train_ds_moe(save_dir: str, reference_dir: str, _stage: int) -> None:
    """Two steps of the DeepSpeed-MoE model; every rank saves its module state (its local experts)."""
    import torch.nn.functional as F

    engine = _ds_moe_engine()
    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        tokens = torch.randint(0, MODEL["vocab_size"], (2, 16), generator=gen)
        out = engine(tokens[:, :-1])
        loss = F.cross_entropy(out.logits_BSV.reshape(-1, MODEL["vocab_size"]), tokens[:, 1:].reshape(-1))
        engine.backward(loss + out.aux_loss)
        engine.step()
    engine.save_checkpoint(save_dir, tag="step2")
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    torch.save(state, Path(reference_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()


def _load_ds_moe(load_dir: str, result_dir: str, _stage: int) -> None:
    """Load ``load_dir`` module-only into a fresh DeepSpeed-MoE engine; every rank saves its module state."""
    engine = _ds_moe_engine()
    path, _ = engine.load_checkpoint(load_dir, load_module_only=True)
    if path is None:
        raise SystemExit(f"DeepSpeed loaded nothing from {load_dir}")
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    torch.save(state, Path(result_dir) / f"rank{torch.distributed.get_rank()}.pt")
    torch.distributed.barrier()


def _load(load_dir: str, result: str, stage: int) -> None:
    """Load ``load_dir`` module-only into a fresh engine, save its module state (rank 0) to ``result`` and
    save the engine again as ``<result's dir>/resaved`` (a genuine ZeRO checkpoint of the loaded weights)."""
    engine = _engine(stage)
    path, _ = engine.load_checkpoint(load_dir, load_module_only=True)
    if path is None:
        raise SystemExit(f"DeepSpeed loaded nothing from {load_dir}")
    if torch.distributed.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, result)
    engine.save_checkpoint(str(Path(result).parent / "resaved"), tag="resaved")
    torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Tests (pytest)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e '.[deepspeed]'); these tests need DeepSpeed to write and "
    "load the checkpoints they convert",
)


def _cfg():
    from sparsetron.config import ModelConfig

    return ModelConfig(**MODEL)


def _torchrun(mode: str, a: Path, b: Path, stage: int = 2) -> None:
    from launch_env import clean_env

    env = clean_env() | {"DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, __file__, mode, str(a), str(b), str(stage)],
        capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env, cwd=a.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _neutral(reader) -> dict[str, torch.Tensor]:
    return {k: v for group in reader.groups() for k, v in group.tensors.items()}


def _copy_without(ckpt: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the trained checkpoint with ``step2/name`` deleted."""
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    (copy / "step2" / name).unlink()
    return copy


def _assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    from sparsetron.checkpoint.convert.neutral import tensor_hash

    assert sorted(got) == sorted(want)
    unequal = [k for k in want if tensor_hash(got[k]) != tensor_hash(want[k])]
    assert not unequal, f"tensors differ: {unequal}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ZeRO-2 checkpoint DeepSpeed wrote on 2 ranks after 2 steps, and rank 0's module state at that point."""
    root = tmp_path_factory.mktemp("ds_zero2")
    _torchrun("train", root / "ckpt", root / "reference.pt")
    return root / "ckpt", torch.load(root / "reference.pt")


def test_reader_gives_the_trained_weights_of_a_zero2_checkpoint(trained):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader
    from sparsetron.checkpoint.convert.neutral import group_names
    from sparsetron.model import Transformer

    ckpt, reference = trained
    ckpt_files = sorted(p.name for p in (ckpt / "step2").iterdir())
    assert ckpt_files == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    reader = DeepSpeedReader(ckpt, _cfg())
    assert reader.describe()["zero_stage"] == 2 and reader.describe()["dp_world_size"] == 2
    assert reader.weights_source.startswith("zero_to_fp32")
    assert [g.name for g in reader.groups()] == group_names(_cfg())
    neutral = _neutral(reader)
    _assert_bitwise_equal(neutral, reference)
    torch.manual_seed(0)
    initial = Transformer(_cfg()).state_dict()
    assert not torch.equal(
        initial["layers.0.moe.experts.w_gate_up"], neutral["layers.0.moe.experts.w_gate_up"]
    )
    # The tag directory itself is accepted too.
    _assert_bitwise_equal(_neutral(DeepSpeedReader(ckpt / "step2", _cfg())), reference)


def test_written_checkpoint_loads_into_a_deepspeed_zero2_engine(trained, tmp_path):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader, DeepSpeedWriter
    from sparsetron.checkpoint.convert.neutral import read_manifest

    ckpt, reference = trained
    out = tmp_path / "converted"
    hashes = DeepSpeedWriter(out).write(_cfg(), DeepSpeedReader(ckpt, _cfg()).groups(), {"source": "test"})
    manifest = read_manifest(out)
    assert manifest["tensors"] == hashes and manifest["source"] == "test"
    assert manifest["target"]["model_only"] is True
    # DeepSpeed loads it with load_module_only=True into a fresh ZeRO-2 engine on 2 ranks, then saves again.
    _torchrun("load", out, tmp_path / "loaded.pt")
    loaded = torch.load(tmp_path / "loaded.pt")
    _assert_bitwise_equal(loaded, reference)
    # ZeRO's fp32 master partitions were refreshed from the loaded weights: DeepSpeed's re-save, read back
    # through zero_to_fp32, is the same model.
    resaved = DeepSpeedReader(tmp_path / "resaved", _cfg())
    assert resaved.weights_source.startswith("zero_to_fp32")
    _assert_bitwise_equal(_neutral(resaved), reference)
    # And the written checkpoint reads back as itself.
    _assert_bitwise_equal(_neutral(DeepSpeedReader(out, _cfg())), reference)


def test_missing_rank_file_names_it(trained, tmp_path):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader
    from sparsetron.checkpoint.convert.neutral import ConversionError

    copy = _copy_without(trained[0], tmp_path, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    reader = DeepSpeedReader(copy, _cfg())
    with pytest.raises(ConversionError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: missing"):
        list(reader.groups())
    (copy / "step2" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ConversionError, match=r"mp_rank_00_model_states\.pt: file not found"):
        DeepSpeedReader(copy, _cfg())


def test_shape_mismatch_and_missing_key_name_file_and_key(trained, tmp_path):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader, DeepSpeedWriter
    from sparsetron.checkpoint.convert.neutral import ConversionError

    ckpt, _ = trained
    wider = _cfg()
    wider.expert_ffn_dim = 48
    with pytest.raises(
        ConversionError, match=r"mp_rank_00_model_states\.pt: tensor layers\.0\.moe\.experts\.w_gate_up "
    ):
        list(DeepSpeedReader(ckpt, wider).groups())

    out = tmp_path / "converted"
    DeepSpeedWriter(out).write(_cfg(), DeepSpeedReader(ckpt, _cfg()).groups(), {})
    states = out / "sparsetron" / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)
    del state["module"]["layers.1.attn.k_proj.weight"]
    torch.save(state, states)
    with pytest.raises(
        ConversionError,
        match=r"mp_rank_00_model_states\.pt: group layers\.1 is missing \['layers\.1\.attn\.k_proj\.weight'\]",
    ):
        list(DeepSpeedReader(out, _cfg()).groups())


def test_wrapped_module_prefix_is_stripped(trained, tmp_path):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader, DeepSpeedWriter

    ckpt, reference = trained
    out = tmp_path / "converted"
    DeepSpeedWriter(out).write(_cfg(), DeepSpeedReader(ckpt, _cfg()).groups(), {})
    states = out / "sparsetron" / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)
    state["module"] = {
        f"module.{k}": v for k, v in state["module"].items()
    }  # e.g. a wrapper around the model
    torch.save(state, states)
    _assert_bitwise_equal(_neutral(DeepSpeedReader(out, _cfg())), reference)


def test_writer_is_atomic_and_refuses_existing_output(trained, tmp_path):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader, DeepSpeedWriter
    from sparsetron.checkpoint.convert.neutral import ConversionError

    ckpt, _ = trained

    def broken():
        for group in DeepSpeedReader(ckpt, _cfg()).groups():
            if group.name == "head":
                group.tensors.pop("norm.weight")
            yield group

    out = tmp_path / "converted"
    with pytest.raises(ConversionError, match=r"group head is missing \['norm\.weight'\]"):
        DeepSpeedWriter(out).write(_cfg(), broken(), {})
    assert not out.exists() and not list(tmp_path.iterdir())
    out.mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        DeepSpeedWriter(out).write(_cfg(), DeepSpeedReader(ckpt, _cfg()).groups(), {})


# DeepSpeed-MoE: experts as per-expert modules, saved by DeepSpeed in layer_<l>_expert_<e> files.

DS_MOE = "layers.{i}.moe.ds.deepspeed_moe"


def _ds_moe_canonical(rank_states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The canonical tensors of the DeepSpeed-MoE model, from each rank's module state (ep=2: rank r holds
    global experts 2r, 2r+1 as local experts 0, 1)."""
    out = {k: v for k, v in rank_states[0].items() if ".deepspeed_moe." not in k}
    local = MODEL["num_experts"] // len(rank_states)
    for i in range(MODEL["n_layers"]):
        prefix = DS_MOE.format(i=i)
        out[f"layers.{i}.moe.router.weight"] = rank_states[0][f"{prefix}.gate.wg.weight"]
        for param in ("w_gate_up", "w_down"):
            out[f"layers.{i}.moe.experts.{param}"] = torch.stack(
                [
                    rank_states[e // local][f"{prefix}.experts.deepspeed_experts.{e % local}.{param}"]
                    for e in range(MODEL["num_experts"])
                ]
            )
    return out


@pytest.fixture(scope="module")
def trained_ds_moe(tmp_path_factory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    """A ZeRO-2 checkpoint of the DeepSpeed-MoE model (ep=2 on 2 ranks) after 2 steps, and each rank's state."""
    root = tmp_path_factory.mktemp("ds_moe")
    (root / "reference").mkdir()
    _torchrun("train_ds_moe", root / "ckpt", root / "reference")
    return root / "ckpt", [torch.load(root / "reference" / f"rank{r}.pt") for r in range(2)]


def test_reader_stacks_deepspeed_moe_expert_files(trained_ds_moe):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader

    ckpt, rank_states = trained_ds_moe
    names = {p.name for p in (ckpt / "step2").iterdir()}
    assert {f"layer_{i}_expert_{e}_mp_rank_00_model_states.pt" for i in range(2) for e in range(4)} <= names
    reader = DeepSpeedReader(ckpt, _cfg())
    assert reader.describe()["deepspeed_moe"] is True
    neutral = _neutral(reader)
    _assert_bitwise_equal(neutral, _ds_moe_canonical(rank_states))
    experts = neutral["layers.1.moe.experts.w_down"]
    assert all(not torch.equal(experts[a], experts[b]) for a in range(4) for b in range(a))


def test_deepspeed_moe_checkpoint_round_trips_through_deepspeed(trained_ds_moe, tmp_path):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader, DeepSpeedWriter

    ckpt, rank_states = trained_ds_moe
    out = tmp_path / "converted"
    DeepSpeedWriter(out, deepspeed_moe_module="ds").write(_cfg(), DeepSpeedReader(ckpt, _cfg()).groups(), {})
    _assert_bitwise_equal(_neutral(DeepSpeedReader(out, _cfg())), _ds_moe_canonical(rank_states))
    (tmp_path / "loaded").mkdir()
    _torchrun("load_ds_moe", out, tmp_path / "loaded")
    for rank in range(2):
        _assert_bitwise_equal(torch.load(tmp_path / "loaded" / f"rank{rank}.pt"), rank_states[rank])


def test_sparsetron_checkpoint_converts_to_deepspeed_moe(trained, tmp_path):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader, DeepSpeedWriter

    ckpt, reference = trained
    out = tmp_path / "converted"
    DeepSpeedWriter(out, deepspeed_moe_module="ds").write(_cfg(), DeepSpeedReader(ckpt, _cfg()).groups(), {})
    module = torch.load(out / "sparsetron" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert torch.equal(
        module[DS_MOE.format(i=1) + ".gate.wg.weight"], reference["layers.1.moe.router.weight"]
    )
    expert = torch.load(out / "sparsetron" / "layer_1_expert_3_mp_rank_00_model_states.pt")
    key = DS_MOE.format(i=1) + ".experts.deepspeed_experts.3.w_down"
    assert list(expert) == [DS_MOE.format(i=1) + ".experts.deepspeed_experts.3.w_gate_up", key]
    assert torch.equal(expert[key], reference["layers.1.moe.experts.w_down"][3])
    _assert_bitwise_equal(_neutral(DeepSpeedReader(out, _cfg())), reference)


def test_missing_expert_file_names_it(trained_ds_moe, tmp_path):
    from sparsetron.checkpoint.convert.deepspeed_format import DeepSpeedReader
    from sparsetron.checkpoint.convert.neutral import ConversionError

    copy = _copy_without(trained_ds_moe[0], tmp_path, "layer_1_expert_2_mp_rank_00_model_states.pt")
    with pytest.raises(
        ConversionError,
        match=r"layer_1_expert_2_mp_rank_00_model_states\.pt: missing, or lacks key "
        r"layers\.1\.moe\.ds\.deepspeed_moe\.experts\.deepspeed_experts\.2\.w_gate_up",
    ):
        list(DeepSpeedReader(copy, _cfg()).groups())


if __name__ == "__main__":
    mode, a, b, stage_arg = sys.argv[1:5]
    {"train": _train, "load": _load, "train_ds_moe": _train_ds_moe, "load_ds_moe": _load_ds_moe}[mode](
        a, b, int(stage_arg)
    )
    sys.exit(0)
