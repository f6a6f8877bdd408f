"""The KaVa objective on tiny models built in code (Llama and Qwen2, with and without GQA)."""

import pytest
import torch

from conftest import tiny_config
from kava.data.schema import Example
from kava.data.sequences import TextEncoder, student_batch, teacher_batch
from kava.distill.compression import attention_importance
from kava.distill.objective import Objective
from kava.model import build_model
from kava.model.latent import final_pass, run_latents
from kava.model.teacher import capture_answer_queries, teacher_forward

EXAMPLES = [
    Example("7*2-7", ("<<7*2=4>>", "<<4-7=7>>"), "7", "a"),
    Example("3+4+1+2", ("<<3+4=7>>", "<<7+1=8>>", "<<8+2=0>>"), "0", "b"),
    Example("5*5", ("<<5*5=5>>",), "5", "c"),
    Example("9-3-3", ("<<9-3=6>>", "<<6-3=3>>"), "3", "d"),
]
ARCHS = [("llama", 4, 2), ("llama", 4, 4), ("qwen2", 4, 2)]


def _setup(arch="llama", heads=4, kv=2, **sections):
    model_sec = {"tiny": {"arch": arch, "num_heads": heads, "num_kv_heads": kv}, **sections.pop("model", {})}
    cfg = tiny_config(model=model_sec, **sections)
    model = build_model(cfg)
    obj = Objective(model, cfg)
    enc = TextEncoder(model.tokenizer, cfg.data)
    return cfg, model, obj, [enc.encode(e) for e in EXAMPLES]


def test_gradients_reach_lora_projection_and_new_tokens_only():
    cfg, model, obj, encs = _setup(model={"adapter": "lora", "lora_r": 4}, loss={"latent_ce": 1.0})
    loss, _ = obj(obj.make_batch(encs))
    loss.backward()
    named = dict(model.named_parameters())
    lora = [n for n in named if "lora_" in n]
    tokens = [n for n in named if "trainable_tokens_delta" in n]
    proj = [n for n in named if n.startswith("projection.")]
    assert lora and tokens and proj
    for n in lora + proj + tokens:
        assert named[n].grad is not None, n
        # LoRA's B starts at zero, so only B (not A) has a non-zero gradient at step one.
        if "lora_A" not in n:
            assert named[n].grad.abs().sum() > 0, n
    frozen = [n for n, p in named.items() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("mlp" in n for n in frozen)
    assert all(named[n].grad is None for n in frozen)
    # Only the rows of <bot>/<eot> move.
    delta = named[tokens[0]]
    assert delta.shape[0] == 2


@pytest.mark.parametrize("arch,heads,kv", ARCHS)
@pytest.mark.parametrize("scheme", ["jacobi", "sequential"])
def test_every_loss_term_falls_on_a_fixed_batch(arch, heads, kv, scheme):
    torch.manual_seed(0)
    cfg, model, obj, encs = _setup(arch, heads, kv, latent={"scheme": scheme}, loss={"latent_ce": 1.0})
    batch = obj.make_batch(encs)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(200):  # (the shared KV normaliser, the std of the whole CoT cache, moves as the teacher trains)
        loss, metrics = obj(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    first, last = history[0], {k: sum(h[k] for h in history[-5:]) / 5 for k in history[0]}
    for term in ("ce_student", "ce_teacher", "codi", "kv", "latent_ce", "loss"):
        assert last[term] < 0.7 * first[term], (term, first[term], last[term])
    assert last["kv_cos"] > first["kv_cos"] + 0.2


def test_teacher_runs_once_and_student_runs_t_plus_one_passes():
    cfg, model, obj, encs = _setup(latent={"scheme": "jacobi", "iterations": 3})
    calls = []
    handle = model.decoder.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        obj(obj.make_batch(encs))
    finally:
        handle.remove()
    tb = obj.make_batch(encs)["teacher"]
    assert calls[0] == tb["input_ids"].shape[1]  # one teacher pass over the whole sequence
    assert len(calls) == 1 + 3 + 1  # teacher + T iterations + final pass


def test_captured_queries_reproduce_eager_attention_over_the_cot():
    cfg, model, obj, encs = _setup(model={"attn_implementation": "eager"})
    model.eval()
    tb = teacher_batch(encs, obj.pad_id, drop_last_step=True)
    store = []
    with torch.no_grad(), capture_answer_queries(model, tb["answer_pos"], store):
        out = model.decoder(
            input_ids=tb["input_ids"],
            attention_mask=tb["attention_mask"].long(),
            output_attentions=True,
            use_cache=True,
        )
    t = teacher_forward(model, tb, want_queries=True)
    cot = tb["cot_step"] >= 0
    for layer in range(len(store)):
        got = attention_importance(t.keys[layer], store[layer], cot, tb["answer_valid"])
        torch.testing.assert_close(
            got, _importance_from_attention(out.attentions[layer], tb, t.keys.shape[2]), atol=1e-5, rtol=1e-4
        )


def _importance_from_attention(att, tb, hkv):
    """R-KV importance computed from an eager attention's own weights ``att [B, H_q, N, N]``:
    answer rows renormalised over the CoT, averaged over the query heads of each KV head."""
    cot = tb["cot_step"] >= 0
    rows = att.gather(2, tb["answer_pos"][:, None, :, None].expand(-1, att.shape[1], -1, att.shape[3]))
    rows = rows * cot[:, None, None, :]
    rows = rows / rows.sum(-1, keepdim=True)
    rows = rows * tb["answer_valid"][:, None, :, None]
    b, hq = rows.shape[:2]
    ref = rows.view(b, hkv, hq // hkv, -1, rows.shape[-1]).sum((2, 3))
    return ref / ref.sum(-1, keepdim=True)


def test_jacobi_with_t_equal_m_matches_sequential():
    cfg, model, obj, encs = _setup(latent={"num_latents": 3, "iterations": 3})
    model.eval()
    sb = student_batch(encs, obj.pad_id, model.bot_id, model.eot_id, 3)
    with torch.no_grad():
        jac = run_latents(model, sb["prefix_ids"], sb["prefix_mask"], 3, "jacobi", 3)
        seq = run_latents(model, sb["prefix_ids"], sb["prefix_mask"], 3, "sequential", 3)
        out_j, _, kj = final_pass(model, jac, sb["suffix_ids"], sb["suffix_mask"])
        out_s, _, ks = final_pass(model, seq, sb["suffix_ids"], sb["suffix_mask"])
    torch.testing.assert_close(jac.producers, seq.producers, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_j.last_hidden_state[:, kj:], out_s.last_hidden_state[:, ks:], atol=1e-5, rtol=1e-4)
    # With fewer iterations the later latents differ (Jacobi has not converged yet).
    with torch.no_grad():
        jac1 = run_latents(model, sb["prefix_ids"], sb["prefix_mask"], 3, "jacobi", 1)
    assert not torch.allclose(jac1.producers[:, 2], seq.producers[:, 2], atol=1e-4)


@pytest.mark.parametrize("scheme", ["jacobi", "sequential"])
def test_padding_does_not_change_an_examples_outputs(scheme):
    cfg, model, obj, encs = _setup(latent={"scheme": scheme})
    model.eval()
    short, long = encs[2], encs[1]  # different question and CoT lengths

    def student_hidden(batch_encs):
        sb = student_batch(batch_encs, obj.pad_id, model.bot_id, model.eot_id, 3)
        st = run_latents(model, sb["prefix_ids"], sb["prefix_mask"], 3, scheme, 2)
        out, _, k = final_pass(model, st, sb["suffix_ids"], sb["suffix_mask"])
        n = int(sb["suffix_mask"][0].sum())
        return out.last_hidden_state[0, : k + n]

    def teacher_logits(batch_encs):
        tb = teacher_batch(batch_encs, obj.pad_id, drop_last_step=True)
        n = int(tb["attention_mask"][0].sum())
        return teacher_forward(model, tb, want_queries=False, want_logits=True).logits[0, :n]

    with torch.no_grad():
        torch.testing.assert_close(student_hidden([short]), student_hidden([short, long]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(teacher_logits([short]), teacher_logits([short, long]), atol=1e-5, rtol=1e-4)


def test_pre_rope_keys_are_position_free():
    """Undoing RoPE: the same token at two positions gives the same pre-RoPE key."""
    cfg, model, obj, encs = _setup(loss={"rope": "pre"})
    model.eval()
    ids = torch.tensor([[5, 9, 5, 9, 5]])
    from transformers import DynamicCache

    from kava.model.latent import cache_span, positions

    cache = DynamicCache()
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        model.run(model.embed(ids), mask, positions(mask), cache)
        keys, _ = cache_span(cache, 0, 5)  # [L, 1, H, 5, d]
        pre = obj.unrotate(keys, positions(mask))
    # Layer 0 keys depend only on the token (before attention mixes anything in).
    assert not torch.allclose(keys[0, 0, :, 0], keys[0, 0, :, 2], atol=1e-4)
    torch.testing.assert_close(pre[0, 0, :, 0], pre[0, 0, :, 2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pre[0, 0, :, 0], pre[0, 0, :, 4], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["none", "mean_pool", "shuffled", "right_crop", "random"])
def test_each_selector_trains_one_step(method):
    cfg, model, obj, encs = _setup(loss={"compression": method})
    loss, metrics = obj(obj.make_batch(encs))
    loss.backward()
    assert torch.isfinite(loss)
    assert ("kv" in metrics) == (method != "none")


def test_curriculum_stages_advance_and_restrict_the_teacher_cot():
    cfg, model, obj, encs = _setup(curriculum={"enabled": True, "steps_per_stage": 2}, latent={"num_latents": 3})
    assert [obj.stage_at(s) for s in range(8)] == [1, 1, 2, 2, 3, 3, 3, 3]
    b = obj.make_batch(encs, step=0)
    assert b["student"]["num_latents"] == 1
    loss, metrics = obj(b)
    assert metrics["stage"] == 1.0 and torch.isfinite(loss)


def test_kv_cosine_grid_is_layers_by_slots_and_matches_the_logged_metric():
    cfg, model, obj, encs = _setup()
    grid = obj.kv_cosine_grid(encs[:1])
    assert len(grid) == cfg.model.tiny.num_layers and all(len(row) == cfg.latent.num_latents for row in grid)
    flat = [v for row in grid for v in row]
    assert all(v is not None and -1.0 <= v <= 1.0 for v in flat)
    model.eval()
    with torch.no_grad():
        _, metrics = obj(obj.make_batch(encs[:1]))
    # Every slot is filled here, so the grid's mean is the logged kv_cos of that one example.
    assert sum(flat) / len(flat) == pytest.approx(float(metrics["kv_cos"]), abs=1e-3)
    assert model.training is False  # the grid leaves the mode as it found it
    _, _, codi_obj, _ = _setup(loss={"alpha_kv": 0})
    assert codi_obj.kv_cosine_grid(encs[:1]) is None


def test_importance_queries_are_the_ones_attention_used_under_lora_dropout():
    # Training mode, LoRA dropout 0.5 on q_proj: a second q_proj call would draw another mask.
    cfg, model, obj, encs = _setup(
        model={"adapter": "lora", "lora_r": 8, "lora_dropout": 0.5, "attn_implementation": "eager"}
    )
    model.train()
    with torch.no_grad():  # LoRA B starts at zero: give the adapters weight so dropout shows
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    tb = teacher_batch(encs, obj.pad_id, drop_last_step=True)
    weights = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, out, i=i: weights.__setitem__(i, out[1].detach()))
        for i, m in enumerate(model.attention_modules())
    ]
    try:
        torch.manual_seed(0)
        t = teacher_forward(model, tb, want_queries=True)
    finally:
        for h in hooks:
            h.remove()
    cot = tb["cot_step"] >= 0
    for layer in range(len(weights)):
        got = attention_importance(t.keys[layer], t.queries[layer], cot, tb["answer_valid"])
        torch.testing.assert_close(
            got, _importance_from_attention(weights[layer], tb, t.keys.shape[2]), atol=1e-5, rtol=1e-4
        )


def test_teacher_runs_without_a_graph_when_its_ce_is_off_and_gradients_are_unchanged():
    grads, needs = {}, {}
    for name in ("no_graph", "graph"):
        cfg, model, obj, encs = _setup(loss={"teacher_ce": 0.0, "latent_ce": 1.0})
        if name == "graph":  # the reference: the teacher pass with its graph, as before
            obj.teacher_needs_graph = lambda: True
        seen = []
        hook = model.decoder.register_forward_hook(
            lambda mod, a, kw, out: seen.append(out.last_hidden_state.requires_grad), with_kwargs=True
        )
        loss, _ = obj(obj.make_batch(encs))
        hook.remove()
        loss.backward()
        needs[name] = seen[0]  # the first decoder call is the teacher's
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert needs == {"no_graph": False, "graph": True}
    assert grads["no_graph"].keys() == grads["graph"].keys()
    for n in grads["graph"]:
        torch.testing.assert_close(grads["no_graph"][n], grads["graph"][n], rtol=1e-6, atol=1e-7, msg=n)
    # With the teacher's CE on, its pass keeps its graph.
    cfg, model, obj, encs = _setup(loss={"teacher_ce": 1.0})
    assert obj.teacher_needs_graph()
    seen = []
    hook = model.decoder.register_forward_hook(
        lambda mod, a, kw, out: seen.append(out.last_hidden_state.requires_grad), with_kwargs=True
    )
    obj(obj.make_batch(encs))
    hook.remove()
    assert seen[0] is True


def test_building_a_model_is_deterministic_for_a_seed():
    """Same seed, same weights, whatever the global RNG did before (the new token rows included)."""
    sums = []
    for noise in (0, 1):
        torch.manual_seed(noise)
        torch.rand(10)
        cfg, model, obj, encs = _setup()
        sums.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(sums[0], sums[1])


def test_teacher_ce_uses_the_head_at_labelled_positions_only():
    cfg, model, obj, encs = _setup()
    tb = teacher_batch(encs, obj.pad_id, drop_last_step=True)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda mod, a, out: rows.append(a[0].shape[0]))
    t = teacher_forward(model, tb, want_queries=False, want_logits=True)
    hook.remove()
    labelled = int((tb["labels"] != -100).sum())
    assert rows[0] == labelled < tb["input_ids"].numel()  # question and padding rows skipped
    from kava import losses

    torch.testing.assert_close(t.ce, losses.token_ce(t.logits, tb["labels"]))


@pytest.mark.parametrize(
    "sections",
    [
        {"latent": {"num_latents": 3}, "curriculum": {"latents_per_step": 2}},  # M % latents_per_step != 0
        {"latent": {"num_latents": 3}, "curriculum": {"max_stage": 1}},  # a last stage set below M
        {"latent": {"num_latents": 2}, "curriculum": {}},  # examples with more steps (3) than stages (2)
    ],
)
def test_the_last_curriculum_stage_is_the_sequence_evaluation_decodes(sections):
    curriculum = {"enabled": True, "steps_per_stage": 2, **sections["curriculum"]}
    cfg, model, obj, encs = _setup(latent=sections["latent"], curriculum=curriculum, loss={"latent_ce": 1.0})
    last = obj.make_batch(encs, step=10**6)
    m = cfg.latent.num_latents
    evaluated = student_batch(encs, obj.pad_id, model.bot_id, model.eot_id, m)  # what evaluation builds (no stage)
    for key, value in evaluated.items():
        if key == "latent_targets":  # training labels only; they follow curriculum.latents_per_step
            continue
        got = last["student"][key]
        assert torch.equal(got, value) if torch.is_tensor(value) else got == value, key
    assert last["stage"] == obj.max_stage()
    # The teacher compresses its whole CoT at that stage, as for evaluation-time targets.
    loss, metrics = obj(last)
    assert torch.isfinite(loss) and float(metrics["stage"]) == obj.max_stage()
    # Earlier stages still replace only their first steps.
    first = obj.make_batch(encs, step=0)
    if obj.max_stage() > 1:
        assert (
            first["sequence_stage"] == 1 and first["student"]["suffix_ids"].shape[1] > evaluated["suffix_ids"].shape[1]
        )
    else:
        assert first["sequence_stage"] is None


def test_shuffled_control_never_hands_an_example_its_own_targets():
    cfg, model, obj, encs = _setup(loss={"compression": "shuffled"})
    model.eval()
    dup = [encs[0], encs[0], encs[1], encs[2]]  # the same example twice, as at an epoch boundary
    batch = obj.make_batch(dup)
    tb = batch["teacher"]
    with torch.no_grad():
        own = _rkv_targets(obj, model, tb)  # [L, B, H, M, d]: each example's own R-KV target
        paired = obj.compute(batch).kv[0].keys
        rolled = obj.compute({**batch, "source_ids": None}).kv[0].keys  # without ids: a plain roll by one

    def source(keys, i):
        return [j for j in range(4) if torch.equal(keys[:, i], own[:, j])]

    # A roll by one hands example 1 the targets of example 0, a copy of itself ...
    assert source(rolled, 1) == [0, 1]
    # ... the pairing by source id never does.
    for i in range(4):
        found = source(paired, i)
        assert found and all(dup[j].source_id != dup[i].source_id for j in found), (i, found)


def _rkv_targets(obj, model, tb):
    from kava.distill.compression import compress_cache, get_selector

    t = teacher_forward(model, tb, want_queries=True)
    c = compress_cache(
        get_selector("rkv", obj.cfg.loss.lam),
        t.keys,
        t.values,
        t.queries,
        tb["cot_step"] >= 0,
        tb["answer_valid"],
        obj.cfg.latent.num_latents,
    )
    return c.keys


def test_kv_cosine_grid_works_for_the_shuffled_control():
    cfg, model, obj, encs = _setup(loss={"compression": "shuffled"})
    grid = obj.kv_cosine_grid(encs)
    assert len(grid) == cfg.model.tiny.num_layers and all(v is not None for row in grid for v in row)


def test_step_metrics_stay_on_the_device(monkeypatch):
    """No host reads inside a step: metrics are tensors, read once per logging step."""
    cfg, model, obj, encs = _setup(loss={"latent_ce": 1.0})
    batch = obj.make_batch(encs)
    reads = []
    for name in ("item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1]
        )
    loss, metrics = obj(batch)
    loss.backward()
    monkeypatch.undo()
    assert reads == []
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    from kava.distill.objective import metric_floats

    floats = metric_floats(metrics)
    assert floats.keys() == metrics.keys() and all(isinstance(v, float) for v in floats.values())


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_parameters_kava_adds_keep_float32_master_weights_on_a_bf16_backbone(adapter):
    cfg, model, obj, encs = _setup(model={"dtype": "bfloat16", "adapter": adapter, "lora_r": 4})
    assert model.decoder.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the backbone is bf16
    added = {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and (n.startswith("projection.") or "lora_" in n or "trainable_tokens" in n)
    }
    assert any(n.startswith("projection.") for n in added)
    assert all(p.dtype == torch.float32 for p in added.values()), {
        n: p.dtype for n, p in added.items() if p.dtype != torch.float32
    }
    # Small AdamW updates move them (in bf16 a LayerNorm gain at 1.0 would not move at lr 8e-4).
    gain = model.projection.net[-1].weight
    start = gain.detach().clone()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=8e-4, weight_decay=0.0)
    batch = obj.make_batch(encs)
    for _ in range(5):
        loss, _ = obj(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert float((gain.detach() - start).abs().max()) > 2e-3
    # The latent inputs come out in the backbone's dtype.
    h = torch.randn(2, 1, cfg.model.tiny.hidden_size, dtype=torch.bfloat16)
    assert model.project(h).dtype == torch.bfloat16


def test_teacher_and_student_answer_accuracy_are_logged():
    """acc_teacher: does the teacher's CODI position predict the first answer token (an empty
    CODI target shows as a low value); acc_student: the same at the student's CODI position."""
    cfg, model, obj, encs = _setup()
    model.eval()
    batch = obj.make_batch(encs)
    with torch.no_grad():
        _, metrics = obj(batch)
    tb = batch["teacher"]
    t = teacher_forward(model, tb, want_queries=False, want_logits=True)
    rows = torch.arange(len(encs))
    first_answer = tb["labels"][rows, tb["distill_pos"]]
    assert torch.equal(first_answer, torch.tensor([e.answer[0] for e in encs]))  # what the CODI position predicts
    expected = (t.logits[rows, tb["distill_pos"]].argmax(-1) == first_answer).float().mean()
    assert float(metrics["acc_teacher"]) == pytest.approx(float(expected))
    assert 0.0 <= float(metrics["acc_student"]) <= 1.0
    # A teacher that predicts the answer everywhere scores 1.
    from kava import losses

    head = torch.nn.Linear(4, 10, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[7, 0] = 1.0
    h = torch.zeros(3, 4)
    h[:, 0] = 1.0
    assert float(losses.answer_accuracy(head, h, torch.tensor([7, 7, -100]))) == 1.0
    assert float(losses.answer_accuracy(head, h, torch.tensor([7, 3, 3]))) == pytest.approx(1 / 3)


def test_teacher_mode_trains_on_the_teachers_own_sequence():
    cfg, model, obj, encs = _setup(train={"mode": "teacher"}, loss={"drop_last_step": True})
    batch = obj.make_batch(encs)
    expected = teacher_batch(encs, obj.pad_id, with_cot=True, drop_last_step=True)
    assert batch.keys() == {"teacher"}
    for key, value in expected.items():
        assert torch.equal(batch["teacher"][key], value), key
    loss, metrics = obj(batch)
    assert torch.isfinite(loss) and set(metrics) == {"loss", "ce"}
