"""Artefacts others can load and evaluation the field's way: checkpoints as peft adapter or
transformers folders, `kava export`, the inference API,
the lm-evaluation-harness adapter, and `kava eval`'s provenance, standard errors, samples and
plain-model baselines. Models are tiny and untrained (their trained tensors are perturbed so
that a tensor lost on the way would show)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from kava.cli import main
from kava.data import load_data
from kava.evaluation import evaluate
from kava.model import (
    ADAPTER_FILE,
    BASE_DIR,
    KAVA_WEIGHTS,
    ModelLoadError,
    build_model,
    checkpoint_layout,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from test_real_models import _save_hf_folder, _tokenizer

IDS = [[3, 9, 12, 5, 7, 2], [4, 4, 8, 1, 6, 10]]


def _trained(cfg):
    """A model built from ``cfg`` whose trained tensors are moved away from their init."""
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _logits(backbone, model):
    ids = torch.tensor([row + [model.bot_id, model.eot_id] for row in IDS])
    with torch.no_grad():
        return backbone.eval()(input_ids=ids).logits


def _lora(**model):
    return tiny_config(model={"adapter": "lora", "lora_r": 4, **model}, data={"synthetic_test_size": 6})


def test_lora_checkpoint_is_a_peft_adapter_folder_with_its_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _trained(_lora())
    save_checkpoint(model, tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    assert checkpoint_layout(ckpt) == "lora" and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_DIR
    tok = AutoTokenizer.from_pretrained(ckpt)  # at the root, with the latent tokens
    assert tok.convert_tokens_to_ids(["<bot>", "<eot>"]) == [model.bot_id, model.eot_id]
    assert set(load_file(str(ckpt / KAVA_WEIGHTS))) == {n for n in model.state_dict() if n.startswith("projection.")}

    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt / BASE_DIR), ckpt)
    reloaded = load_checkpoint(ckpt)
    mine = _logits(model.backbone, model)
    torch.testing.assert_close(_logits(theirs, model), mine)
    torch.testing.assert_close(_logits(reloaded.backbone, model), mine, rtol=0, atol=0)
    for n, t in model.projection.state_dict().items():
        assert torch.equal(reloaded.projection.state_dict()[n], t)


def test_lora_on_a_local_base_opens_with_peft_on_the_resized_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _save_hf_folder(tmp_path / "hf", _tokenizer(), tied=False)
    model = _trained(_lora(name_or_path=str(tmp_path / "hf")))
    save_checkpoint(model, tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    assert not (ckpt / BASE_DIR).exists()  # the base reloads from its folder
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "hf").resolve())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    base.resize_token_embeddings(model.base_model.get_input_embeddings().weight.shape[0])
    theirs = PeftModel.from_pretrained(base, ckpt)
    torch.testing.assert_close(_logits(theirs, model), _logits(model.backbone, model))
    torch.testing.assert_close(
        _logits(load_checkpoint(ckpt).backbone, model), _logits(model.backbone, model), rtol=0, atol=0
    )


def test_full_checkpoint_is_a_transformers_model_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _trained(tiny_config())
    save_checkpoint(model, tmp_path / "ckpt")
    assert checkpoint_layout(tmp_path / "ckpt") == "full"
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "llama"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(_logits(theirs, model), _logits(model.backbone, model), rtol=0, atol=0)
    # A resume loads the folder into a freshly built model.
    fresh = build_model(tiny_config())
    load_weights(fresh, tmp_path / "ckpt")
    a, b = fresh.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path):
    model = _trained(_lora())
    save_checkpoint(model, tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / ADAPTER_FILE))
    dropped = sorted(k for k in saved if "lora_B" in k)[0]
    save_file({k: v for k, v in saved.items() if k != dropped}, str(tmp_path / "ckpt" / ADAPTER_FILE))
    with pytest.raises(ModelLoadError, match=f"{ADAPTER_FILE}: does not match the model: missing"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "kava_config.yaml").write_text("{}\n")
    with pytest.raises(ModelLoadError, match="not a kava checkpoint"):
        load_checkpoint(tmp_path / "empty")


# --- the inference API ------------------------------------------------------------------


def test_inference_api_answers_as_kava_eval_does(tmp_path):
    import kava
    from kava.evaluation import inference

    assert kava.load is inference.load and kava.LatentReasoner is inference.LatentReasoner
    cfg = _lora()
    model = _trained(cfg)
    save_checkpoint(model, tmp_path / "ckpt")
    examples = load_data(cfg, "eval")
    reasoner = kava.load(tmp_path / "ckpt", device="cpu")
    questions = [ex.question for ex in examples]
    for mode, decoder_mode in (("latent", "student"), ("cot", "cot"), ("nocot", "nocot")):
        evaluate(reasoner.model, examples, cfg, [decoder_mode], tmp_path / mode)
        rows = [json.loads(x) for x in (tmp_path / mode / f"predictions_{decoder_mode}.jsonl").read_text().splitlines()]
        answers = reasoner.answer(questions, mode=mode, batch_size=4)
        assert [a.text for a in answers] == [r["prediction"] for r in rows]
        assert [a.forward_passes for a in answers] == [r["forward_passes"] for r in rows]
        assert [a.truncated for a in answers] == [r["truncated"] for r in rows]
        one_by_one = reasoner.answer(questions[:3], mode=mode, batch_size=1)
        assert [a.text for a in one_by_one] == [a.text for a in answers[:3]]
    latent = reasoner.answer(questions[:1], mode="latent")[0]
    # latent passes (T Jacobi iterations), the <eot> + answer-prefix pass, one per token after the first
    assert latent.forward_passes == cfg.latent.iterations + 1 + latent.generated_tokens - 1
    assert latent.text.startswith(cfg.data.answer_prefix)
    forced = kava.LatentReasoner(reasoner.model, grader="flexible")
    assert forced.answer(["1+1"], mode="nocot", max_new_tokens=2)[0].generated_tokens <= 2
    with pytest.raises(ValueError, match="unknown mode"):
        reasoner.answer(questions, mode="fast")
    with pytest.raises(TypeError, match="list of questions"):
        reasoner.answer("1+1")


def test_import_kava_loads_no_torch():
    code = "import kava, sys; assert 'torch' not in sys.modules, 'torch loaded'; print(kava.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- kava export --------------------------------------------------------------------------


def test_export_writes_a_merged_model_with_a_card_and_pushes(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kava

    cfg = _lora()
    model = _trained(cfg)
    save_checkpoint(model, tmp_path / "run" / "checkpoint-5")
    ckpt = tmp_path / "run" / "checkpoint-5"
    assert main(["eval", "--checkpoint", str(ckpt), "--modes", "student,nocot"]) == 0
    results = json.loads((ckpt / "eval" / "synthetic-test" / "results.json").read_text())["results"]
    # A second dataset goes to a folder of its own (the first is kept); the card names both.
    assert main(["eval", "--checkpoint", str(ckpt), "--data", "synthetic?n=4&seed=3", "--limit", "3"]) == 0
    second = json.loads((ckpt / "eval" / "synthetic_n_4_seed_3-test-3" / "results.json").read_text())
    assert second["provenance"]["data"] == "synthetic?n=4&seed=3" and second["results"]["student"]["n"] == 3
    assert json.loads((ckpt / "eval" / "synthetic-test" / "results.json").read_text())["results"] == results
    calls = []
    monkeypatch.setattr("kava.model.export.hub_unreachable", lambda: None)  # a hub that answers, offline
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **kw: calls.append(("create_repo", a, kw)))
    monkeypatch.setattr(
        huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload_folder", (), kw)) or "https://hub/commit/1"
    )
    capsys.readouterr()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "export"), "--push-to-hub", "someone/tiny-kava"]) == 0
    out = tmp_path / "export"
    assert {"config.json", "model.safetensors", "tokenizer.json", KAVA_WEIGHTS, "kava_config.yaml", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "adapter_config.json").exists()
    # A plain transformers model: LoRA and the trained <bot>/<eot> rows merged in.
    theirs = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in theirs.named_parameters())
    torch.testing.assert_close(_logits(theirs, model), _logits(model.backbone, model))
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(["<bot>", "<eot>"]) == [model.bot_id, model.eot_id]
    # It is a full-model kava checkpoint too: latent answers as from the checkpoint.
    q = [ex.question for ex in load_data(cfg, "eval")]
    assert [a.text for a in kava.load(out).answer(q)] == [a.text for a in kava.load(ckpt).answer(q)]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| training mode | `kava` |" in card and "LoRA (r=4" in card and "M = 3, `jacobi`, T = 2" in card
    assert "- training: `synthetic` (split `train`)" in card
    r = results["student"]
    assert f"| student | {r['n']} | {100 * r['accuracy']:.1f}% | {100 * r['accuracy_stderr']:.1f}% |" in card
    assert "On `synthetic` (split `test`)" in card and "from `eval/synthetic-test/results.json`" in card
    assert (
        "On `synthetic?n=4&seed=3` (split `test`, first 3)" in card
        and "eval/synthetic_n_4_seed_3-test-3/results.json" in card
    )
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == ("someone/tiny-kava",) and calls[0][2]["exist_ok"] and calls[0][2]["repo_type"] == "model"
    assert calls[1][2]["repo_id"] == "someone/tiny-kava" and calls[1][2]["folder_path"] == str(out)
    assert "pushed to someone/tiny-kava: https://hub/commit/1" in capsys.readouterr().out


# --- kava eval: provenance, standard errors, samples, plain models -------------------------


def test_eval_results_carry_provenance_stderr_and_samples(tmp_path):
    from kava.evaluation.evaluator import evaluate_checkpoint

    model = _trained(tiny_config())
    save_checkpoint(model, tmp_path / "ckpt")
    res, out = evaluate_checkpoint(tmp_path / "ckpt", ["data.eval_limit=5"], ["student", "nocot"], tmp_path / "ev")
    data = json.loads((out / "results.json").read_text())
    assert data["results"] == res == json.loads((out / "eval_metrics.json").read_text())
    prov = data["provenance"]
    assert prov["checkpoint"] == str((tmp_path / "ckpt").resolve()) and prov["model"] == "tiny"
    assert (prov["data"], prov["split"], prov["limit"], prov["modes"]) == ("synthetic", "test", 5, ["student", "nocot"])
    assert prov["grader"]["headline"] == "strict" and prov["grader"]["graders"] == ["strict", "flexible"]
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["kava"]
    assert "commit" in prov["git"] and prov["date"].endswith("+00:00")
    for mode, r in res.items():
        rows = [json.loads(x) for x in (out / f"predictions_{mode}.jsonl").read_text().splitlines()]
        assert len(rows) == r["n"] == 5
        p = sum(row["verdicts"]["strict"] for row in rows) / 5
        assert r["accuracy"] == p and r["accuracy_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 4))
        for row in rows:
            assert {"prompt", "target", "generation", "verdicts"} <= row.keys()
            assert row["prediction"] == model.cfg.data.answer_prefix + row["generation"]
            assert row["prompt"].startswith(row["question"]) and row["prompt"].endswith(model.cfg.data.answer_prefix)
            assert ("<bot>[3 latents]<eot>" in row["prompt"]) == (mode == "student")
    from kava.evaluation.results import accuracy_stderr

    assert accuracy_stderr(3, 4) == pytest.approx(0.25) and accuracy_stderr(1, 1) is None


def test_eval_of_a_plain_model_folder_needs_no_checkpoint(tmp_path, capsys):
    _save_hf_folder(tmp_path / "hf", _tokenizer())
    args = [
        "eval",
        "--model",
        str(tmp_path / "hf"),
        "--limit",
        "4",
        "--out",
        str(tmp_path / "ev"),
        "eval.max_cot_tokens=8",
    ]
    assert main(args) == 2  # neither --config nor --data: the defaults' data would be no baseline of anything
    assert "--config" in capsys.readouterr().err
    args.extend(["--data", "synthetic"])
    assert main(args) == 0
    data = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(data["results"]) == {"cot", "nocot"} and data["results"]["cot"]["n"] == 4
    assert data["provenance"]["checkpoint"] is None and data["provenance"]["model"] == str(tmp_path / "hf")
    assert not list(tmp_path.glob("**/checkpoint-*"))  # nothing was trained
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "hf"), "--data", "synthetic", "--modes", "student"]) == 2
    assert "needs a trained kava checkpoint" in capsys.readouterr().err


def test_eval_of_a_chat_model_without_config_says_it_drops_the_chat_template(tmp_path, caplog):
    """``kava eval --model`` of an Instruct folder with ``--data`` alone: the default config gives
    the bare question; a warning says so and what to add, unless the template was chosen."""
    _save_hf_folder(tmp_path / "hf", _tokenizer(chat=True))
    args = ["eval", "--model", str(tmp_path / "hf"), "--data", "synthetic", "--limit", "2", "--modes", "nocot"]
    with caplog.at_level("WARNING", logger="kava.eval"):
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "kava.eval"]
    assert len(said) == 1 and "chat template" in said[0] and "model.use_chat_template=true" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="kava.eval"):
        assert main([*args, "--out", str(tmp_path / "b"), "model.use_chat_template=true"]) == 0
    assert not [r for r in caplog.records if r.name == "kava.eval"]
    assert "<|user|>" in json.loads((tmp_path / "b" / "predictions_nocot.jsonl").read_text().splitlines()[0])["prompt"]


# --- lm-evaluation-harness ------------------------------------------------------------------


TASK = """task: kava_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: after-prefix
    filter:
      - function: regex
        regex_pattern: "The answer is:(.*)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_harness_runs_latent_generation_on_a_local_task(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import kava
    from kava.evaluation.harness import KavaLM

    assert get_model("kava") is KavaLM
    cfg = _lora()
    model = _trained(cfg)
    save_checkpoint(model, tmp_path / "ckpt")
    questions = [ex.question for ex in load_data(cfg, "eval")]
    answers = [
        a.generation.split("\n")[0]
        for a in kava.load(tmp_path / "ckpt").answer(questions, batch_size=1, max_new_tokens=6)
    ]
    # Targets: the model's own reply for the even rows, one it never gives for the odd rows -> exact match 1/2.
    # lm-eval's regex filter strips what it captures, so a reply with a leading space is stripped too.
    rows = [
        {"question": q, "answer": a.strip() if i % 2 == 0 else "never"}
        for i, (q, a) in enumerate(zip(questions, answers))
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kava_local.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    lm = get_model("kava").create_from_arg_string(f"pretrained={tmp_path / 'ckpt'}", {"batch_size": 1, "device": "cpu"})
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # no scan of the built-in tasks
    out = lm_eval.simple_evaluate(model=lm, tasks=["kava_local"], task_manager=tasks, log_samples=True)
    assert out["results"]["kava_local"]["exact_match,after-prefix"] == pytest.approx(0.5)
    by_doc = {s["doc_id"]: s for s in out["samples"]["kava_local"]}
    assert [by_doc[i]["resps"][0][0] for i in range(len(rows))] == [cfg.data.answer_prefix + a for a in answers]
    with pytest.raises(ValueError, match="greedy"):
        lm.generate_until([type("Req", (), {"args": ("1+1", {"do_sample": True})})()])
    with pytest.raises(ValueError, match="unknown model_args bogus"):
        KavaLM(pretrained=str(tmp_path / "ckpt"), bogus=1)


def test_kava_lm_eval_hands_its_arguments_to_the_harness_with_kava_registered(monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval.__main__

    seen = {}

    def fake_cli():
        from lm_eval.api.registry import get_model

        seen["argv"], seen["kava"], seen["hf"] = (
            list(sys.argv),
            get_model("kava").__name__,
            "hf" in __import__("lm_eval.api.registry").api.registry.model_registry,
        )

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
    args = ["--model", "kava", "--model_args", "pretrained=X", "--tasks", "t", "--include_path", "dir"]
    assert main(["lm-eval", *args]) == 0
    assert seen == {"argv": ["lm-eval", *args], "kava": "KavaLM", "hf": True}
    assert sys.argv[:1] != ["lm-eval"]  # restored


def test_export_keeps_the_base_models_dtype_unless_told(tmp_path):
    """A base whose config.json says bfloat16 exports in bfloat16 under --dtype auto (half the
    float32 size), --dtype float32 gives float32, and a model built in code stays float32."""
    from kava.model.export import export

    _save_hf_folder(tmp_path / "hf", _tokenizer(), tied=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    save_checkpoint(_trained(_lora(name_or_path=str(tmp_path / "hf"))), tmp_path / "ckpt")

    def dtypes(folder):
        return {t.dtype for t in load_file(str(folder / "model.safetensors")).values()}

    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "auto")]) == 0
    assert dtypes(tmp_path / "auto") == {torch.bfloat16}
    assert {t.dtype for t in load_file(str(tmp_path / "auto" / KAVA_WEIGHTS)).values()} == {torch.float32}
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert dtypes(tmp_path / "f32") == {torch.float32}
    save_checkpoint(_trained(tiny_config()), tmp_path / "code")
    export(tmp_path / "code", tmp_path / "code-out")
    assert dtypes(tmp_path / "code-out") == {torch.float32}
    with pytest.raises(ValueError, match="--dtype 'int8'"):
        export(tmp_path / "code", tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()
