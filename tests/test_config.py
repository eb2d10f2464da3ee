"""Config loading: schema, merge order, overrides, typos, bad values, round trips (tier 0)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetron.config import (
    Config,
    ConfigError,
    CPMethod,
    Scheduler,
    field_docs,
    load_config,
    to_yaml,
    write_resolved,
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_typed():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.parallel.cp_method is CPMethod.ring
    assert cfg.parallel.dp_shard == -1
    assert cfg.train.dp.algorithm.value == "ddp"


def test_every_field_has_a_docstring():
    def walk(cls, prefix=""):
        for f in fields(cls):
            yield prefix + f.name
            if f.default_factory is not None and is_dataclass(f.default_factory):
                yield from walk(f.default_factory, prefix + f.name + ".")

    docs = field_docs()
    keys = list(walk(Config))
    assert set(keys) == set(docs)
    assert all(len(docs[k]) > 10 for k in keys), [k for k in keys if len(docs[k]) <= 10]


def test_merge_order_defaults_preset_cluster_run_cli(tmp_path):
    cluster = write(
        tmp_path,
        "cluster.yaml",
        "cluster: {scheduler: slurm, procs_per_node: 8}\ntrain: {lr: 0.1, steps: 7}\n",
    )
    run = write(tmp_path, "run.yaml", "model: {preset: tiny, dim: 96}\ntrain: {lr: 0.2}\n")
    cfg = load_config(run, ["train.lr=0.3", "model.n_layers=5"], cluster_yaml=cluster)
    assert cfg.train.lr == 0.3  # CLI beats run beats cluster
    assert cfg.train.steps == 7  # cluster beats defaults
    assert cfg.cluster.scheduler is Scheduler.slurm and cfg.cluster.procs_per_node == 8
    assert cfg.model.dim == 96  # run beats preset
    assert cfg.model.expert_ffn_dim == 128  # preset (tiny) beats defaults
    assert cfg.model.n_layers == 5


def test_preset_chosen_on_the_command_line_still_sits_under_the_run_file(tmp_path):
    run = write(tmp_path, "run.yaml", "model: {dim: 96}\n")
    cfg = load_config(run, ["model.preset=demo"])
    assert cfg.model.dim == 96 and cfg.model.num_experts == 8


def test_several_run_files_merge_left_to_right(tmp_path):
    a = write(tmp_path, "a.yaml", "parallel: {cp: 2, ep: 2}\n")
    b = write(tmp_path, "b.yaml", "parallel: {cp: 4}\n")
    cfg = load_config([a, b])
    assert (cfg.parallel.cp, cfg.parallel.ep) == (4, 2)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("parallel: {cpp: 2}\n", ["unknown key 'parallel.cpp'", "did you mean 'parallel.cp'?"]),
        ("model: {num_expert: 8}\n", ["unknown key 'model.num_expert'", "did you mean 'model.num_experts'?"]),
        ("paralel: {cp: 2}\n", ["unknown key 'paralel' in the top level", "did you mean 'parallel'?"]),
        (
            "train: {dp: {algoritm: ddp}}\n",
            ["unknown key 'train.dp.algoritm'", "did you mean 'train.dp.algorithm'?"],
        ),
        ("parallel: {cp: two}\n", ["bad value for 'parallel.cp'", "'two'", "Context-parallel degree"]),
        ("parallel: {cp_method: rng}\n", ["bad value for 'parallel.cp_method'", "ring, ulysses, hybrid"]),
    ],
)
def test_bad_keys_and_values_name_the_file_key_and_fix(tmp_path, text, fragments):
    path = write(tmp_path, "run.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_bad_override_is_reported_as_an_override():
    with pytest.raises(
        ConfigError,
        match="command-line overrides: unknown key 'train.setps' in section 'train'; did you mean 'train.steps'",
    ):
        load_config(None, ["train.setps=3"])
    with pytest.raises(ConfigError, match="override 'train.steps' is not of the form key=value"):
        load_config(None, ["train.steps"])


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="run config '.*missing.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "model: {dim: [1, 2\n"))
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(
        ConfigError, match="model.preset 'nope' not found .*available presets: .*mixtral-8x7b.*tiny"
    ):
        load_config(None, ["model.preset=nope"])


def test_a_preset_may_only_set_the_model(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    write(tmp_path / "model", "sneaky.yaml", "model: {dim: 8}\ntrain: {lr: 1.0}\n")
    monkeypatch.setenv("SPARSETRON_CONFIGS", str(tmp_path))
    with pytest.raises(ConfigError, match="must contain only a 'model:' section"):
        load_config(None, ["model.preset=sneaky"])


def test_resolved_yaml_round_trips_and_is_written_atomically(tmp_path):
    cfg = load_config(
        None, ["model.preset=tiny", "parallel.cp=2", "parallel.cp_method=hybrid", "cluster.env.FOO=bar"]
    )
    path = write_resolved(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
    assert load_config(path) == cfg
    assert "cp_method: hybrid" in path.read_text()


@settings(max_examples=40, deadline=None)
@given(
    steps=st.integers(1, 10**6),
    lr=st.floats(1e-8, 10, allow_nan=False),
    cp=st.integers(1, 64),
    method=st.sampled_from([m.value for m in CPMethod]),
    run_dir=st.text(alphabet="abcdefgh/_-", min_size=1, max_size=20),
)
def test_overrides_round_trip_through_yaml(steps, lr, cp, method, run_dir):
    overrides = [
        f"train.steps={steps}",
        f"train.lr={lr!r}",
        f"parallel.cp={cp}",
        f"parallel.cp_method={method}",
        f"train.run_dir='{run_dir}'",
    ]
    cfg = load_config(None, overrides)
    assert (cfg.train.steps, cfg.train.lr, cfg.parallel.cp, cfg.parallel.cp_method.value) == (
        steps,
        lr,
        cp,
        method,
    )
    assert cfg.train.run_dir == run_dir
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(to_yaml(cfg))
        assert load_config(path) == cfg
