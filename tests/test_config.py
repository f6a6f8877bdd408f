"""Configuration layering, validation and the shipped config files."""

from pathlib import Path

import pytest

from kava.config import ConfigError, KavaConfig, config_from_dict, help_lines, load_config, parse_overrides, read_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 0.01, batch_size: 3}\nlatent: {num_latents: 5}\n")
    cfg = load_config(f, ["train.lr=1e-3", "latent.scheme=sequential", "model.lora_target_modules=q_proj,v_proj"])
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 3
    assert cfg.latent.num_latents == 5 and cfg.latent.scheme == "sequential"
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.latent.iterations == KavaConfig().latent.iterations


def test_base_files_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {lr: 0.5, seed: 7}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {lr: 0.25}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.train.lr == 0.25 and cfg.train.seed == 7


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.lrr=1", "train.lrr"),
        ("latent.scheme=diagonal", "latent.scheme"),
        ("train.batch_size=two", "train.batch_size"),
        ("loss.lam=1.5", "loss.lam"),
        ("loss.compression=magic", "loss.compression"),
        ("model.tiny.num_kv_heads=3", "model.tiny.num_kv_heads"),
        ("train.mode=rl", "train.mode"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: 1\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        read_yaml(f)
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=0.003", "loss.kv_loss=mse", "curriculum.enabled=true"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_every_field_has_help():
    lines = help_lines()
    assert len(lines) > 60
    assert all(line.split(": ", 1)[1].strip() for line in lines)
    assert any(line.startswith("teachers.models[].cache ") for line in lines)  # entries of a list of sections


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "sweeps" not in p.parts and "accelerate" not in p.parts),
    ids=str,
)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, KavaConfig)


def test_shuffled_needs_two_examples():
    from kava.distill.targets import check_targets

    cfg = config_from_dict({"loss": {"compression": "shuffled"}, "train": {"batch_size": 1}})
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_targets(cfg)
