"""``kava export``: a checkpoint as a plain transformers model folder others can use without
kava, with a model card.

The folder holds the backbone with any LoRA (and the trained ``<bot>``/``<eot>`` rows)
merged in (``config.json``, ``model.safetensors``), the tokenizer with ``<bot>``/``<eot>``,
the latent projection (``kava_model.safetensors``: latent mode needs it, plain generation
does not), the recipe (``kava_config.yaml``) and ``README.md``, a model card stating the
recipe, the data and the evaluation found beside the checkpoint. It is also a full-model
kava checkpoint, so ``kava eval --checkpoint`` and ``kava.load`` open it.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import KavaConfig
from ..io import OutputError, atomic_replace_dir, check_output_folder, hub_offline, hub_unreachable
from .checkpoints import CONFIG_FILE, KAVA_WEIGHTS, STATE_JSON, find_checkpoint, load_checkpoint
from .files import quiet_transformers

log = logging.getLogger("kava.export")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def find_evaluations(ckpt: Path) -> list[tuple[dict, dict, Path]]:
    """:func:`_find_evaluations`; a damaged file there is named in a warning and the card says
    no evaluation was found."""
    try:
        return _find_evaluations(ckpt)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning(
            "the evaluation beside %s cannot be read (%s: %s); the model card leaves it out",
            ckpt,
            type(e).__name__,
            str(e)[:200],
        )
        return []


def _find_evaluations(ckpt: Path) -> list[tuple[dict, dict, Path]]:
    """(``{mode: metrics}``, provenance or ``{}``, the file) of every evaluation of ``ckpt``:
    ``kava eval``'s ``CHECKPOINT/eval/<data>-<split>[-<limit>]/results.json`` (and an older
    ``CHECKPOINT/eval/results.json`` or ``eval_metrics.json``), else the run's end-of-training
    ``eval_metrics.json`` when the run's ``status.json`` names this checkpoint."""
    found = []
    for folder in [ckpt / "eval", *sorted(p for p in (ckpt / "eval").glob("*") if p.is_dir())]:
        if (folder / "results.json").is_file():
            data = json.loads((folder / "results.json").read_text())
            found.append((data["results"], data.get("provenance", {}), folder / "results.json"))
        elif (folder / "eval_metrics.json").is_file():
            found.append((json.loads((folder / "eval_metrics.json").read_text()), {}, folder / "eval_metrics.json"))
    if found:
        return found
    run, status = ckpt.parent, ckpt.parent / "status.json"
    if (run / "eval_metrics.json").is_file() and status.is_file():
        named = json.loads(status.read_text()).get("checkpoint")
        if named and Path(named).resolve() == ckpt.resolve():
            return [
                (
                    json.loads((run / "eval_metrics.json").read_text()),
                    {"data": _run_eval_data(run)},
                    run / "eval_metrics.json",
                )
            ]
    return []


def _run_eval_data(run: Path) -> str | None:
    """The evaluation data a run's ``config.yaml`` names (what its end-of-training evaluation read)."""
    import yaml

    try:
        d = yaml.safe_load((run / "config.yaml").read_text()).get("data", {})
    except (OSError, AttributeError, yaml.YAMLError):
        return None
    return d.get("eval")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def model_card(cfg: KavaConfig, ckpt: Path, steps: int | None, evaluations: list[tuple[dict, dict, Path]]) -> str:
    """The model card: YAML front matter, what the model is, its recipe, data and evaluation."""
    # Kept whole (over 60 lines): the card's text, top to bottom, as it is written.
    m, lat, loss, d, t = cfg.model, cfg.latent, cfg.loss, cfg.data, cfg.train
    front = ["---", "library_name: transformers", "tags:", "- kava", "- latent-reasoning"]
    if _HUB_ID.match(m.name_or_path) and not Path(m.name_or_path).exists():
        front.append(f"base_model: {m.name_or_path}")
    front.append("---")
    adapter = (
        f"LoRA (r={m.lora_r}, alpha={m.lora_alpha}, {', '.join(m.lora_target_modules)}), merged"
        if m.adapter == "lora"
        else "full fine-tuning"
    )
    recipe = [
        ("training mode", f"`{t.mode}`"),
        ("base model", f"`{m.name_or_path}`" + (f" (from `{m.init_from}`)" if m.init_from else "")),
        ("adapter", adapter),
        (
            "latents",
            f"M = {lat.num_latents}, `{lat.scheme}`"
            + (f", T = {lat.iterations}" if lat.scheme == "jacobi" else "")
            + (", projection MLP" if lat.projection else ""),
        ),
        (
            "KV distillation",
            f"selector `{loss.compression}` (lambda {loss.lam}), `{loss.kv_loss}`, alpha_kv = {loss.alpha_kv}",
        ),
        ("CODI", f"`{loss.codi_loss}`, alpha_codi = {loss.alpha_codi}"),
        (
            "CE weights",
            f"student {loss.student_ce}, teacher {loss.teacher_ce}, latent {loss.latent_ce}; drop last step: "
            f"{loss.drop_last_step}",
        ),
        ("curriculum", "on" if cfg.curriculum.enabled else "off"),
        (
            "optimisation",
            f"{steps if steps is not None else '?'} steps, lr {t.lr}, {t.lr_schedule} schedule, "
            f"batch {t.batch_size} (effective {t.effective_batch or t.batch_size}), seed {t.seed}",
        ),
    ]
    lines = [
        *front,
        "",
        f"# {ckpt.parent.name}/{ckpt.name}" if ckpt.name.startswith("checkpoint-") else f"# {ckpt.name}",
        "",
        "A causal language model trained with kava to reason in continuous latent tokens "
        "(KaVa: compressed KV-cache distillation, CODI self-distillation, PCCoT Jacobi latents).",
        "",
        "This folder is a plain `transformers` model (any LoRA merged in); `<bot>` and `<eot>` are in its tokenizer "
        "and embeddings. Latent-mode answers also need the projection in `kava_model.safetensors`: load the folder "
        "with `kava.load(DIR)`. `kava_config.yaml` is the full recipe.",
        "",
        "## Recipe",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in recipe],
        "",
        "## Data",
        "",
        f"- training: `{d.train}` (split `{d.train_split}`"
        + (f", first {d.train_limit}" if d.train_limit else "")
        + ")",
        f"- evaluation: `{d.eval}` (split `{d.eval_split}`" + (f", first {d.eval_limit}" if d.eval_limit else "") + ")",
        "",
        "## Evaluation",
        "",
    ]
    if not evaluations:
        lines.append(
            "No evaluation was found beside the checkpoint (run `kava eval --checkpoint CHECKPOINT` before exporting)."
        )
    else:
        lines += [
            "Accuracy is the strict grader's (a number right after an answer marker); flexible also takes the last "
            "number."
        ]
    for results, prov, source in evaluations:
        where = source.relative_to(ckpt) if source.is_relative_to(ckpt) else Path("..") / source.name
        lines += [""]
        if prov.get("split"):
            lines += [
                f"On `{prov.get('data')}` (split `{prov.get('split')}`"
                + (f", first {prov['limit']}" if prov.get("limit") else "")
                + f"), greedy decoding, {prov.get('date', '')}; from `{where}`:",
                "",
            ]
        else:
            lines += [f"On `{prov.get('data') or '?'}`, from `{where}`:", ""]
        lines += ["| mode | n | accuracy | ± s.e. | flexible | forward passes |", "|---|---|---|---|---|---|"]
        for mode, r in results.items():
            lines.append(
                f"| {mode} | {r.get('n')} | {_pct(r.get('accuracy'))} | {_pct(r.get('accuracy_stderr'))} | "
                f"{_pct(r.get('accuracy_flexible'))} | {r.get('forward_passes', 0):.1f} |"
            )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(DIR)   # CoT / no-CoT generation",
        "",
        "import kava",
        'print(kava.load(DIR).answer(["..."], mode="latent")[0].answer)',
        "```",
        "",
    ]
    return "\n".join(lines)


# What an export writes (the only entries --replace may remove from an existing --out).
_EXPORT_NAMES = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|kava_model\.safetensors|kava_config\.yaml|README\.md"
    r"|tokenizer[\w.]*|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.\w+|merges\.txt|chat_template\.\w+)$"
)


def check_export_out(ckpt: Path, out: Path, replace: bool) -> None:
    """Stop before any work when ``out`` cannot take an export of ``ckpt``: a file; the
    checkpoint itself, inside it, or a folder holding it (its run folder); a folder that is not
    empty (unless ``replace``, and then only when it holds nothing but an earlier export's files)."""
    check_output_folder(out, "--out")
    src, dst = ckpt.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise OutputError(
            f"--out {out}: it is, holds or lies inside the checkpoint {ckpt} being exported; choose a folder outside it"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return
    entries = sorted(out.iterdir())
    if not replace:
        raise OutputError(
            f"--out {out} is not empty ({', '.join(p.name for p in entries[:4])}"
            f"{', ...' if len(entries) > 4 else ''}); choose an empty folder, or --replace to replace "
            "an earlier export"
        )
    foreign = [p.name for p in entries if p.is_symlink() or not p.is_file() or not _EXPORT_NAMES.match(p.name)]
    if foreign or not (out / CONFIG_FILE).is_file():
        why = (
            f"holds {foreign[0]!r}, which an export does not write"
            if foreign
            else f"has no {CONFIG_FILE}: not a kava export"
        )
        raise OutputError(f"--out {out} {why}; --replace only replaces an earlier export's own files")


def _saved_step(ckpt: Path) -> int | None:
    """The step a checkpoint's trainer state records, or None (absent or unreadable)."""
    try:
        step = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))["progress"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


EXPORT_DTYPES = ("auto", "bfloat16", "float16", "float32")


def base_dtype(cfg: KavaConfig) -> str | None:
    """The dtype the base model's own ``config.json`` records (``dtype`` or ``torch_dtype``) when
    ``model.name_or_path`` is a local folder, else None (a model built in code, the hub, GGUF)."""
    f = Path(cfg.model.name_or_path) / "config.json"
    try:
        found = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, ValueError):
        return None
    name = found.get("dtype") or found.get("torch_dtype") if isinstance(found, dict) else None
    return name if name in EXPORT_DTYPES[1:] else None


def export_dtype(dtype: str, cfg: KavaConfig, weights: torch.dtype) -> torch.dtype:
    """The dtype of the exported weights: ``dtype``, or for ``auto`` the base model's own
    (:func:`base_dtype`; a bfloat16 base exports at its size, not as float32), else the
    checkpoint's weights' dtype."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(EXPORT_DTYPES)}")
    name = dtype if dtype != "auto" else base_dtype(cfg)
    return getattr(torch, name) if name else weights


def export(
    checkpoint: str | Path, out: str | Path, trust_remote_code: bool = False, replace: bool = False, dtype: str = "auto"
) -> Path:
    """Write the merged model folder of ``checkpoint`` (or a run's latest) into ``out``
    atomically; returns ``out``. ``trust_remote_code``: as for :func:`load_checkpoint`. An
    ``out`` that is not empty is refused unless ``replace`` and it holds an earlier export
    (:func:`check_export_out`); the checkpoint or run folder read is never written. ``dtype``:
    of the merged weights (:func:`export_dtype`; the latent projection stays float32)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(EXPORT_DTYPES)}")
    ckpt = find_checkpoint(checkpoint)
    out = Path(out)
    check_export_out(ckpt, out, replace)
    check_export_out(Path(checkpoint), out, replace)  # (a run folder given: not into it either)
    model = load_checkpoint(ckpt, trust_remote_code=trust_remote_code)
    own = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if not n.startswith("backbone.")}
    cfg = copy.deepcopy(model.cfg)
    merged = model.merged_backbone()
    merged.to(export_dtype(dtype, cfg, next(merged.parameters()).dtype))
    recipe = copy.deepcopy(cfg)
    recipe.model.adapter = "full"  # the folder holds every weight, merged
    steps = _saved_step(ckpt)
    card = model_card(cfg, ckpt, steps, find_evaluations(ckpt))

    def build(tmp: Path) -> None:
        with quiet_transformers():
            merged.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        if own:
            save_file(own, str(tmp / KAVA_WEIGHTS), metadata={"format": "kava"})
        recipe.save(tmp / CONFIG_FILE)
        (tmp / "README.md").write_text(card)

    check_export_out(ckpt, out, replace)  # (again: nothing has appeared there meanwhile)
    atomic_replace_dir(out, build)
    return out


def check_push_target(repo_id: str) -> None:
    """Before any export work: ``repo_id`` is a valid hub model repo id and the hub can be
    reached (offline mode cannot push); else :class:`~kava.io.OutputError` naming it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise OutputError(f"--push-to-hub {repo_id!r}: not a hub repo id ({str(e).splitlines()[0]})") from None
    if hub_offline():
        raise OutputError(f"--push-to-hub {repo_id}: offline mode is on (HF_HUB_OFFLINE); nothing can be pushed")
    reason = hub_unreachable()
    if reason is not None:
        raise OutputError(
            f"--push-to-hub {repo_id}: the hub cannot be reached ({reason}); export without it and push later"
        )


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` to it (huggingface_hub);
    returns the commit URL. A refusal of the hub is one :class:`~kava.io.OutputError` line."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    check_push_target(repo_id)
    try:
        huggingface_hub.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        info = huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            token=token,
            commit_message=f"kava export of {Path(folder).name}",
        )
    except HfHubHTTPError as e:  # not logged in, no write access, a name taken
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OutputError(f"--push-to-hub {repo_id}: the hub refused the upload ({first}); {folder} is kept") from None
    return str(getattr(info, "commit_url", info))
