import dataclasses
import typing
from pathlib import Path

import pytest

from mmkit.config import (
    SECTIONS,
    Config,
    ConfigError,
    absolute_paths,
    load_config,
    parse_cli,
    save_resolved,
    to_toml,
    validate,
)

RECIPE = """
[model]
family = "qwen2_5_vl"
flavor = "tiny"
task = "sft"
freeze_vision = true

[data]
paths = []
cutoff_len = 256
packing = true

[train]
steps = 20
global_batch = 8
micro_batch = 2
mixed_precision = "bf16"

[optim]
lr = 1          # an int in the file for a float field
betas = [0.9, 0.95]
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RECIPE)
    return path


def test_toml_then_overrides_with_type_coercion(recipe, tmp_path):
    cfg = parse_cli(
        [
            "--config", str(recipe),
            "--train.steps", "7",
            "--optim.min_lr=1e-5",
            "--optim.betas", "[0.8,0.99]",
            "--parallel.pp_layers", "[[1,2],[3,4]]",
            "--data.paths", f"{recipe},{recipe}",
            "--checkpoint.no_save_rng",  # flag without a value = true
            "--model.freeze_vision", "false",
            "--metrics-file", str(tmp_path / "m.jsonl"),  # alias of logging.metrics_file
            "--log-tps",
            "--data.max_samples", "none",
        ],
        world_size=1,
    )  # fmt: skip
    assert cfg.model.family == "qwen2_5_vl" and cfg.data.packing is True and cfg.data.cutoff_len == 256
    assert cfg.train.steps == 7 and cfg.train.mixed_precision == "bf16"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.min_lr == 1e-5
    assert cfg.optim.betas == [0.8, 0.99]
    assert cfg.parallel.pp_layers == [[1, 2], [3, 4]]
    assert cfg.data.paths == [str(recipe), str(recipe)]
    assert cfg.checkpoint.no_save_rng is True and cfg.model.freeze_vision is False
    assert cfg.logging.metrics_file == str(tmp_path / "m.jsonl") and cfg.logging.log_tps is True
    assert cfg.data.max_samples is None
    assert cfg.dp_size == 1 and cfg.grad_accum_steps == 4  # 8 / (2 x 1)


def test_flat_list_and_yaml(tmp_path):
    cfg = load_config(None, {"parallel.pp_layers": "[12,16]", "parallel.pp": "2"})
    assert cfg.parallel.pp_layers == [12, 16] and cfg.parallel.pp == 2
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 3\n  seed: 9\noptim:\n  betas: [0.5, 0.6]\n")
    cfg = load_config(path)
    assert (cfg.train.steps, cfg.train.seed, cfg.optim.betas) == (3, 9, [0.5, 0.6])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train.stpes", "3"], "unknown field 'train.stpes'; did you mean 'train.steps'?"),
        (["--trian.steps", "3"], "unknown config section 'trian'; did you mean 'train'?"),
        (["--train.lr", "1e-3"], "unknown field 'train.lr'; did you mean 'optim.lr'?"),
        (["--steps", "3"], "unknown option '--steps'; did you mean '--train.steps'?"),
        (["--learning_rate", "1e-3"], "unknown option '--learning_rate'; did you mean '--optim.lr'?"),
        (["--optim.learning_rate", "1e-3"], "unknown field 'optim.learning_rate'; did you mean 'optim.lr'?"),
        (["--optim.lr", "nan"], "optim.lr=nan: is not a number"),
        (["--train.grad_clip", "nan"], "train.grad_clip=nan: is not a number"),
        (["--optim.lr", "inf"], "optim.lr=inf: must be finite"),
        (["--train.steps", "many"], "train.steps='many': expected an integer"),
        (["--train.ema", "maybe"], "train.ema='maybe': expected a boolean"),
        (["--train.steps"], "--train.steps needs a value"),
        (
            ["--parallel.pp_layers", "[[1,2],3]"],
            "parallel.pp_layers='[[1,2],3]': expected list[int] | list[list[int]]",
        ),
        (["positional"], "unexpected argument 'positional'"),
    ],
)
def test_cli_errors_name_the_key_and_suggest(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_cli(argv, world_size=1)
    assert message in str(e.value)


def test_unknown_key_in_file_suggests(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[optim]\nwarmup_step = 10\n[model]\nfamily = "wan"\n')
    with pytest.raises(
        ConfigError, match=r"bad.toml: unknown field 'optim.warmup_step'; did you mean 'optim.warmup_steps'"
    ):
        load_config(path)
    path.write_text("[optimizer]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match="unknown config section 'optimizer'; did you mean 'optim'"):
        load_config(path)
    path.write_text('[train]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match="train.steps='ten': expected an integer"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_validation_lists_every_problem_with_its_fix():
    cfg = load_config(
        None,
        {
            "train.global_batch": 10,
            "train.micro_batch": 2,
            "data.num_frames": 18,
            "data.height": 100,
            "optim.lr": -1,
            "model.task": "sft",
            "model.activation_checkpointing": "some",
        },
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=2)  # dp_shard=-1 fills 2 -> unit = micro 2 x dp 2 = 4
    msg = str(e.value)
    assert "train.global_batch=10: not divisible by micro_batch (2) x data-parallel size (2) = 4" in msg
    assert "set it to a multiple of 4 (e.g. 8 or 12)" in msg
    assert "data.num_frames=18: must be 4k+1" in msg and "e.g. 17 or 21" in msg
    assert "data.height=100: must be a positive multiple of 16" in msg
    assert "optim.lr=-1.0: must be > 0" in msg
    assert "model.task='sft': family 'wan' supports task t2v or i2v" in msg
    assert "model.activation_checkpointing='some': choose one of none, full, selective" in msg


def test_parallel_sizes_against_world_size():
    cfg = validate(load_config(None, {"parallel.tp": 2, "train.global_batch": 4}), world_size=8)
    assert cfg.parallel.dp_shard == 4 and cfg.parallel.sequence_parallel is True and cfg.grad_accum_steps == 1
    with pytest.raises(
        ConfigError, match=r"dp_replicate\(1\) x dp_shard\(2\) x tp\(2\).* = 4 != world size 8"
    ):
        validate(load_config(None, {"parallel.tp": 2, "parallel.dp_shard": 2}), world_size=8)
    with pytest.raises(ConfigError, match="= 3 does not divide the world size 4"):
        validate(load_config(None, {"parallel.cp": 3}), world_size=4)
    with pytest.raises(ConfigError, match="parallel.ulysses_degree=3: hybrid cp needs"):
        validate(
            load_config(None, {"parallel.cp": 4, "parallel.cp_algo": "hybrid", "parallel.ulysses_degree": 3}),
            4,
        )


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(
        None,
        {
            "model.init_from": None,
            "data.paths": ["a b.txt", 'quote".json'],
            "data.media_root": "C:\\media",
            "parallel.pp_layers": [[1, 2], [3]],
            "optim.min_lr": 1e-7,
            "logging.peak_tflops": 12.5,
        },
    )
    cfg.data.paths = []  # (validate checks paths exist; the strings above went through to_toml below)
    cfg = validate(cfg, world_size=1)
    cfg.data.paths = ["a b.txt", 'quote".json']
    path = save_resolved(cfg, tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "config.toml"
    text = path.read_text()
    assert "# JSONL metrics file" in text  # documented
    back = load_config(path)
    assert back == absolute_paths(cfg)  # paths saved absolute: resume / export work from any directory
    assert back.data.paths == [str(Path.cwd() / "a b.txt"), str(Path.cwd() / 'quote".json')]
    assert to_toml(back) == text


def test_every_field_documented_and_optional_defaults_are_none():
    for section, klass in SECTIONS.items():
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            assert len(f.metadata.get("help", "")) > 10, f"{section}.{f.name} has no help"
            if type(None) in typing.get_args(hints[f.name]):
                # unset fields are omitted from the resolved TOML, so reading it back must give None
                assert f.default is None, f"{section}.{f.name}"
    assert Config().train.steps > 0


def test_help_lists_fields(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert (
        "--checkpoint.no_load_optim (bool, default False)" in out
        and "--metrics-file = --logging.metrics_file" in out
    )


def test_nan_is_reported_once_for_its_own_field():
    with pytest.raises(ConfigError) as e:
        parse_cli(["--optim.lr", "nan"], world_size=1)
    assert "min_lr" not in str(e.value) and str(e.value).count("optim.lr=nan") == 1


def test_warmup_longer_than_the_run_warns_and_goes_on():
    with pytest.warns(UserWarning, match=r"warmup_steps=10 is longer than train.steps=6.*0\.6 x optim.lr"):
        cfg = parse_cli(["--train.steps", "6", "--optim.warmup_steps", "10"], world_size=1)
    assert cfg.train.steps == 6
