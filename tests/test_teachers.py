"""Other teachers end to end: different shapes, RoPE settings and tokenizers, fused."""

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_config
from kava.config import ConfigError
from kava.data.schema import Example
from kava.data.sequences import TextEncoder
from kava.distill.objective import Objective, metric_floats
from kava.distill.targets.teachers import kv_shape
from kava.model import ModelLoadError, build_model, save_checkpoint
from kava.model.latent import cache_span, positions

EXAMPLES = [
    Example("7*2-7", ("<<7*2=4>>", "<<4-7=7>>"), "7", "a"),
    Example("3+4+1+2", ("<<3+4=7>>", "<<7+1=8>>", "<<8+2=0>>"), "0", "b"),
    Example("5*5", ("<<5*5=5>>",), "5", "c"),
    Example("9-3-3", ("<<9-3=6>>", "<<6-3=3>>"), "3", "d"),
]
# Three teachers unlike the student (2 layers, width 32, 4 query / 2 KV heads of size 8):
DEEP_MQA = {
    "num_layers": 5,
    "hidden_size": 48,
    "num_heads": 4,
    "num_kv_heads": 1,
    "head_dim": 16,
    "intermediate_size": 96,
    "rope_theta": 50000.0,
    "rope_scaling": 2.0,
}  # one KV head, scaled RoPE
WIDE_CHARS = {
    "arch": "qwen2",
    "num_layers": 3,
    "hidden_size": 64,
    "num_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 24,
    "intermediate_size": 128,
    "tokenizer": "char",
}  # another tokenizer, bias in q/k/v
SHALLOW = {"num_layers": 1, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 64}


def _setup(shapes, **sections):
    tsec = {"models": [{"name_or_path": "tiny", "tiny": t} for t in shapes], **sections.pop("teachers", {})}
    cfg = tiny_config(teachers=tsec, loss={"rope": "pre", **sections.pop("loss", {})}, **sections)
    model = build_model(cfg)
    obj = Objective(model, cfg)
    encs = [TextEncoder(model.tokenizer, cfg.data).encode(e) for e in EXAMPLES]
    return cfg, model, obj, encs


@pytest.mark.parametrize("aggregation", ["interp", "mean", "weighted", "concat"])
def test_three_teachers_of_other_shapes_train_the_student_and_their_aligners(aggregation):
    cfg, model, obj, encs = _setup([DEEP_MQA, WIDE_CHARS, SHALLOW], teachers={"aggregation": aggregation})
    batch = obj.make_batch(encs)
    # The char-level teacher reads longer sequences than the word-level student and teachers.
    lengths = [b["input_ids"].shape[1] for b in batch["external"]]
    assert lengths[1] > lengths[0] + 10 and lengths[0] == lengths[2]
    again = obj.make_batch(encs)  # encoded once per teacher and example, then reused
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batch["external"], again["external"]))
    assert [len(seen) for seen in obj.teachers._encoded] == [len(EXAMPLES)] * 3
    loss, metrics = obj(batch)
    loss.backward()
    assert torch.isfinite(loss) and {"kv", "kv_cos", "w0", "w1", "w2"} <= metrics.keys()
    assert float(metrics["w0"]) == pytest.approx(1 / 3, abs=1e-5)  # fixed, equal weights
    for t in obj.teachers.externals:  # frozen, and kept out of the trainable module tree
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    names = {n for n, _ in obj.named_parameters()}
    assert not any(".externals." in n for n in names)
    for al in obj.teachers.aligners:
        assert al.k_weight.grad is not None and al.k_weight.grad.abs().sum() > 0
    if aggregation == "weighted":
        # (a one-layer teacher has nothing to mix: its softmax over one layer is constant)
        assert all(al.layer_logits.grad.abs().sum() > 0 for al in obj.teachers.aligners if al.teacher.layers > 1)
    grads = [p.grad for n, p in model.named_parameters() if "k_proj" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "fusion,router", [("similarity", "mlp"), ("router", "mlp"), ("router", "gate"), ("router", "attention")]
)
def test_fusion_kinds_route_per_slot_and_routers_learn(fusion, router):
    cfg, model, obj, encs = _setup(
        [DEEP_MQA, WIDE_CHARS], teachers={"fusion": fusion, "router": router, "include_self": True}
    )
    loss, metrics = obj(obj.make_batch(encs))
    loss.backward()
    weights = [float(metrics[f"w{i}"]) for i in range(3)]
    assert (
        sum(weights) == pytest.approx(1.0, abs=1e-4)
        and 0.0 <= float(metrics["router_entropy"]) <= torch.log(torch.tensor(3.0)).item() + 1e-5
    )
    router_params = list(obj.teachers.fusion.parameters())
    assert bool(router_params) == (fusion == "router")
    if fusion == "router":
        assert all(p.grad is not None for p in router_params)


@pytest.mark.parametrize("layer_std", [False, True])
def test_an_identical_external_teacher_gives_the_self_distillation_loss(tmp_path, layer_std):
    """A teacher that is a saved copy of the student, fused alone, reproduces the plain KaVa loss. Under
    ``loss.layer_std`` the own pass is scaled by its whole CoT cache's std and another teacher by its aligned
    targets' (:mod:`kava.distill.targets.teachers`), so there the KV loss differs and the rest does not."""
    cfg = tiny_config(loss={"alpha_codi": 1.0, "layer_std": layer_std})
    model = build_model(cfg)
    save_checkpoint(model, tmp_path / "copy")
    model.eval()
    encs = [TextEncoder(model.tokenizer, cfg.data).encode(e) for e in EXAMPLES]
    plain = Objective(model, cfg)
    cfg2 = tiny_config(
        loss={"alpha_codi": 1.0, "layer_std": layer_std},
        teachers={"models": [{"name_or_path": str(tmp_path / "copy")}]},
    )
    other = Objective(model, cfg2)
    assert other.teachers.aligners[0].identity
    with torch.no_grad():
        a = metric_floats(plain(plain.make_batch(encs))[1])
        b = metric_floats(other(other.make_batch(encs))[1])
    assert b["codi"] == pytest.approx(a["codi"], rel=1e-4) and b["kv_cos"] == pytest.approx(a["kv_cos"], abs=1e-4)
    assert (b["kv"] == pytest.approx(a["kv"], rel=1e-4)) is not layer_std


def test_scaled_rope_teacher_keys_are_compared_position_free():
    """Pre-RoPE keys of a teacher with another RoPE base and linear scaling are the raw k_proj outputs."""
    cfg, model, obj, encs = _setup([DEEP_MQA])
    teacher = obj.teachers.externals[0]
    ids = torch.tensor([[5, 9, 5, 9, 5, 7]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    cache = DynamicCache()
    with torch.no_grad():
        h = teacher.embed(ids)
        teacher.run(h, mask, positions(mask), cache)
        keys, _ = cache_span(cache, 0, ids.shape[1])  # [L, 1, 1, 6, 16]
        pre = obj.unrotate(keys, positions(mask), model=teacher)
        layer0 = teacher.decoder.layers[0]
        raw = layer0.self_attn.k_proj(layer0.input_layernorm(h)).view(1, 6, 1, 16).transpose(1, 2)
    torch.testing.assert_close(pre[0], raw, atol=1e-5, rtol=1e-4)
    # Undoing the student's (unscaled) RoPE instead would not recover them.
    assert not torch.allclose(obj.unrotate(keys[..., :8], positions(mask)), raw[..., :8], atol=1e-3)


def test_kv_loss_through_a_larger_teacher_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg, model, obj, encs = _setup([DEEP_MQA], loss={"alpha_codi": 1.0})
    opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=3e-3)
    batch = obj.make_batch(encs)
    first = None
    for _ in range(60):
        loss, metrics = obj(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or metrics
    assert metrics["kv"] < 0.7 * first["kv"] and metrics["codi"] < 0.7 * first["codi"]


def test_teacher_shapes_are_read_from_the_models():
    cfg, model, obj, encs = _setup([DEEP_MQA, WIDE_CHARS])
    shapes = [kv_shape(t) for t in obj.teachers.externals]
    assert [(s.layers, s.kv_heads, s.head_dim, s.hidden) for s in shapes] == [(5, 1, 16, 48), (3, 2, 24, 64)]
    assert (kv_shape(model).layers, kv_shape(model).kv_heads, kv_shape(model).head_dim) == (2, 2, 8)


def test_bad_teacher_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="loss.rope"):
        _setup([DEEP_MQA], loss={"rope": "post"})
    with pytest.raises(ModelLoadError, match=r"teachers.models\[0\].name_or_path"):
        _setup([], teachers={"models": [{"name_or_path": str(tmp_path / "missing")}]})
    with pytest.raises(ModelLoadError, match=r"teachers.models\[0\].name_or_path: .* is neither a kava checkpoint"):
        _setup([], teachers={"models": [{"name_or_path": str(tmp_path)}]})  # a folder with no model in it
    with pytest.raises(ConfigError, match=r"'teachers.models\[1\].name_or_path'"):  # names the entry
        tiny_config(teachers={"models": [{"name_or_path": "tiny"}, {"weight": 2.0}]})
    with pytest.raises(ConfigError, match="teacher_cache"):
        tiny_config(teachers={"models": [{"name_or_path": "tiny"}]}, loss={"teacher_cache": str(tmp_path)})
    with pytest.raises(ConfigError, match="either name_or_path"):
        tiny_config(teachers={"models": [{"name_or_path": "tiny", "cache": str(tmp_path)}]})
    with pytest.raises(ConfigError, match="teachers.fusion"):
        tiny_config(teachers={"models": [{"name_or_path": "tiny"}], "fusion": "vote"})


def test_training_with_a_router_resumes_exactly(tmp_path):
    """Aligners and router are saved beside each checkpoint (safetensors) and restored by --resume."""
    from safetensors.torch import load_file

    from kava.distill.targets.teachers import ALIGN_FILE
    from kava.model import WEIGHTS_FILE, load_checkpoint
    from kava.training import train
    from test_train import _train_until

    def cfg(name, steps):
        return tiny_config(
            teachers={"models": [{"name_or_path": "tiny", "tiny": DEEP_MQA}], "fusion": "router", "include_self": True},
            loss={"rope": "pre"},
            train={"output_dir": str(tmp_path / name), "max_steps": steps, "save_every": 2},
        )

    train(cfg("straight", 4))
    assert _train_until(cfg("resumed", 4), 2)["state"] == "interrupted"  # pre-empted after step 2
    assert train(cfg("resumed", 4), resume=True)["step"] == 4
    for f in (WEIGHTS_FILE, ALIGN_FILE):
        a, b = (
            load_file(str(tmp_path / "straight" / "checkpoint-4" / f)),
            load_file(str(tmp_path / "resumed" / "checkpoint-4" / f)),
        )
        assert a.keys() == b.keys() and any("fusion" in k for k in a) == (f == ALIGN_FILE)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # A run folder names its latest checkpoint as a teacher: frozen, with exactly those weights.
    from kava.config import TeacherModelConfig
    from kava.distill.targets.teachers import load_teacher

    teacher = load_teacher(TeacherModelConfig(name_or_path=str(tmp_path / "straight")), cfg("unused", 1))
    saved = load_checkpoint(tmp_path / "straight" / "checkpoint-4").state_dict()
    mine = teacher.state_dict()
    assert mine.keys() == saved.keys() and all(torch.equal(mine[k], saved[k]) for k in saved)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_a_teachers_offline_cache_gives_the_same_loss_as_running_it(tmp_path):
    """`kava teacher extract` run with the larger teacher as the model; the student reads it back."""
    from kava.distill.extract import extract
    from kava.distill.targets.cache import TeacherCacheError

    teacher_cfg = tiny_config(model={"tiny": DEEP_MQA}, loss={"rope": "pre"})
    examples = [e for e in EXAMPLES]
    extract(teacher_cfg, tmp_path / "cache", examples=examples, shard_size=3)
    online = _setup([DEEP_MQA], loss={"alpha_codi": 1.0})
    cfg = tiny_config(
        teachers={"models": [{"cache": str(tmp_path / "cache")}]}, loss={"rope": "pre", "alpha_codi": 1.0}
    )
    obj = Objective(online[1], cfg)
    assert obj.teachers.externals == [None] and obj.teachers.aligners[0].teacher.layers == 5
    obj.teachers.load_state_dict(online[2].teachers.state_dict())  # the same adapter initialisation
    online[1].eval()
    with torch.no_grad():
        a = metric_floats(online[2](online[2].make_batch(online[3]))[1])
        b = metric_floats(obj(obj.make_batch(online[3]))[1])
    assert b["kv"] == pytest.approx(a["kv"], rel=1e-5) and b["codi"] == pytest.approx(a["codi"], rel=1e-5)
    # A cache made with another M (or selector, lambda, RoPE mode) is refused, naming the field.
    with pytest.raises(TeacherCacheError, match="latent.num_latents"):
        Objective(
            online[1],
            tiny_config(
                teachers={"models": [{"cache": str(tmp_path / "cache")}]},
                loss={"rope": "pre"},
                latent={"num_latents": 5},
            ),
        )


def test_resume_without_the_teachers_file_is_a_clear_error(tmp_path):
    from kava.distill.targets.teachers import ALIGN_FILE
    from kava.training import TrainingError, train

    cfg = tiny_config(
        teachers={"models": [{"name_or_path": "tiny", "tiny": SHALLOW}], "aggregation": "weighted"},
        loss={"rope": "pre"},
        train={
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "lr_schedule": "constant",
            "warmup_ratio": 0.0,
            "warmup_steps": 0,
        },
    )
    train(cfg)
    (tmp_path / "run" / "checkpoint-2" / ALIGN_FILE).unlink()
    cfg.train.max_steps = 3
    with pytest.raises(TrainingError, match=ALIGN_FILE):
        train(cfg, resume=True)
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").is_file()  # nothing already written is lost
