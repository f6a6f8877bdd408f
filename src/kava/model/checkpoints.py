"""Checkpoint folders, read and written here alone.

A checkpoint ``checkpoint-N/`` is a standard folder others can open, with kava's own parts
beside it:

* LoRA: a peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``: the
  LoRA weights and the trained ``<bot>``/``<eot>`` rows), which
  ``peft.PeftModel.from_pretrained(base, DIR)`` opens on the base with its embeddings resized
  to the tokenizer; a base built in code is saved beside it as ``base_model/`` (a
  transformers folder);
* full fine-tuning: a ``save_pretrained`` model folder (``config.json``,
  ``model.safetensors``), which ``AutoModelForCausalLM.from_pretrained(DIR)`` opens;
* both: the tokenizer (with ``<bot>``/``<eot>``) at the root, ``kava_config.yaml`` (the run's
  config), ``kava_model.safetensors`` (the latent projection: every tensor kava adds outside
  the backbone) and, written by the training loop, the trainer state
  (``kava_trainer_state.safetensors`` + ``kava_trainer_state.json``: kava's own names, since
  transformers' ``trainer_state.json`` has another schema).

:func:`save_checkpoint` writes one atomically, :func:`load_checkpoint` rebuilds a model from
one, :func:`load_weights` loads one into a model already built (a resume), and
:func:`build_model` makes a run's model, starting from ``model.init_from``'s checkpoint where
the config names one (:func:`start_backbone`).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import KavaConfig, ModelConfig, config_from_dict, read_yaml
from ..io import atomic_replace_dir
from .backbone import (
    KavaModel,
    _clean_name,
    _local_source,
    architecture_differences,
    load_backbone,
    resolve_dtype,
    wrap_backbone,
)
from .files import (
    ModelLoadError,
    check_model_json,
    check_readable,
    check_shapes,
    config_errors,
    quiet_transformers,
    read_tensors,
    refuse_pickled,
    refuse_remote_code,
)

log = logging.getLogger("kava.model")

CONFIG_FILE = "kava_config.yaml"
WEIGHTS_FILE = "model.safetensors"  # full fine-tuning: the transformers weights
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
KAVA_WEIGHTS = "kava_model.safetensors"
BASE_DIR = "base_model"
STATE_TENSORS = "kava_trainer_state.safetensors"
STATE_JSON = "kava_trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_layout(path: str | Path) -> str:
    """``lora`` (a peft adapter folder) or ``full`` (a transformers model folder) for a kava
    checkpoint folder; anything else is an error, and so is a pickled file in it
    (:func:`~kava.model.files.refuse_pickled`)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ModelLoadError(f"{path}: not a kava checkpoint (no {CONFIG_FILE})")
    refuse_pickled(path)
    refuse_pickled(path / BASE_DIR)
    if (path / ADAPTER_CONFIG).is_file():
        if not (path / ADAPTER_FILE).is_file():
            raise ModelLoadError(f"{path}: has {ADAPTER_CONFIG} but no {ADAPTER_FILE}")
        return "lora"
    if (path / "config.json").is_file():
        return "full"
    raise ModelLoadError(f"{path}: not a kava checkpoint (needs {ADAPTER_CONFIG} or config.json beside {CONFIG_FILE})")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint's model (adapter, model shards, ``base_model/``,
    kava's own tensors; not the trainer state nor other teachers' adapters), sorted."""
    path = Path(path)
    found = [
        path / ADAPTER_FILE,
        path / KAVA_WEIGHTS,
        *path.glob("model*.safetensors"),
        *(path / BASE_DIR).glob("model*.safetensors"),
    ]
    return sorted(p for p in found if p.is_file())


def checkpoint_tensors(path: str | Path) -> dict:
    """Every tensor of a checkpoint's model files, keyed ``FILE:NAME`` (``FILE`` relative to
    the checkpoint); for comparing checkpoints whatever their layout."""
    from safetensors.torch import load_file

    path = Path(path)
    return {f"{f.relative_to(path)}:{k}": v for f in weight_files(path) for k, v in load_file(str(f)).items()}


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a checkpoint folder, else the latest ``checkpoint-N`` of a run folder."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no kava checkpoint here (expected {CONFIG_FILE} or checkpoint-N folders)")
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder with the highest step in ``run_dir``, if any.

    Never an older one in its place without a word: when the newest ``checkpoint-N`` is
    incomplete or damaged (no ``kava_config.yaml`` or ``trainer_state.json``), or is a symbolic
    link, this stops naming it and the newest complete one, for the user to choose."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted((int(m.group(1)), child) for child in run_dir.iterdir() if (m := CHECKPOINT_RE.match(child.name)))
    if not found:
        return None
    step, newest = found[-1]
    if newest.is_symlink():
        raise ModelLoadError(
            f"{newest} is a symbolic link; kava does not follow links inside a run folder "
            "(give the checkpoint it points to with --checkpoint, or replace the link by the folder)"
        )
    if newest.is_dir() and (newest / CONFIG_FILE).is_file() and (newest / STATE_JSON).is_file():
        return newest
    missing = CONFIG_FILE if not (newest / CONFIG_FILE).is_file() else STATE_JSON
    older = [
        p for _, p in found[:-1] if not p.is_symlink() and (p / CONFIG_FILE).is_file() and (p / STATE_JSON).is_file()
    ]
    alt = (
        f"the newest complete one is {older[-1].name}: give it explicitly, or move {newest.name} away"
        if older
        else "no older complete checkpoint exists"
    )
    raise ModelLoadError(f"{newest}: incomplete or damaged checkpoint (no {missing}); not falling back silently: {alt}")


def base_reference(model: KavaModel) -> str:
    """Where the base of a LoRA checkpoint comes from: ``base_model`` (saved beside the
    adapter) for a backbone built in code, else the base model's path or hub id (or the
    ``model.init_from`` checkpoint it was merged from)."""
    if not model.base_reloadable:
        return BASE_DIR
    return _local_source(model.cfg.model.init_from or model.cfg.model.name_or_path)


def write_checkpoint(model: KavaModel, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint into an existing folder (not atomic by itself): the config, the
    tokenizer at the root, the backbone as a peft adapter folder (LoRA; with ``base_model/``
    when the base cannot be reloaded) or a transformers model folder (full fine-tuning),
    and kava's own tensors (the projection) in :data:`KAVA_WEIGHTS`.

    ``state``: a full state dict gathered elsewhere (FSDP), named as ``model.state_dict()``.
    """
    folder = Path(folder)
    cfg = copy.deepcopy(model.cfg)
    cfg.model.name_or_path = _local_source(cfg.model.name_or_path)
    cfg.model.init_from = _local_source(cfg.model.init_from)
    cfg.save(folder / CONFIG_FILE)
    model.tokenizer.save_pretrained(folder)
    named = {_clean_name(n): t for n, t in (model.state_dict() if state is None else state).items()}
    backbone = {n.removeprefix("backbone."): t for n, t in named.items() if n.startswith("backbone.")}
    own = {n: t.detach().to("cpu").contiguous() for n, t in named.items() if not n.startswith("backbone.")}
    with quiet_transformers():
        if model.is_lora:
            model.backbone.peft_config["default"].base_model_name_or_path = base_reference(model)
            model.backbone.save_pretrained(folder, state_dict=backbone, save_embedding_layers=False)
            (folder / "README.md").unlink(missing_ok=True)  # peft's blank model card
            if not model.base_reloadable:
                model.base_model.save_pretrained(folder / BASE_DIR, state_dict=plain_base_state(backbone))
        else:
            model.backbone.save_pretrained(folder, state_dict=backbone if state is not None else None)
    if own:
        save_file(own, str(folder / KAVA_WEIGHTS), metadata={"format": "kava"})


def save_checkpoint(model: KavaModel, path: str | Path) -> None:
    """Save atomically: the folder appears complete or not at all."""
    atomic_replace_dir(Path(path), lambda tmp: write_checkpoint(model, tmp))


_ADAPTER_PARTS = (".lora_", "trainable_tokens_delta", "trainable_tokens_original")


def plain_base_state(backbone_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's own tensors, named as the plain transformers model names them, from
    the state of a peft-wrapped backbone: the adapters' tensors left out, the wrapper segments
    (``base_model.model.``, ``.base_layer``, ``.token_adapter``) taken out of the names."""
    out = {}
    for name, t in backbone_state.items():
        if any(part in name for part in _ADAPTER_PARTS):
            continue
        name = (
            name.removeprefix("base_model.model.")
            .replace(".token_adapter.base_layer.", ".")
            .replace(".base_layer.", ".")
        )
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _stored_config(path: str | Path) -> KavaConfig:
    """The config a checkpoint folder holds, as written; errors name its file."""
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: not a kava checkpoint (no {CONFIG_FILE})")
    try:
        return config_from_dict(read_yaml(cfg_file))
    except ValueError as e:  # ConfigError: name the checkpoint's file
        raise ModelLoadError(f"{cfg_file}: {str(e).removeprefix(str(cfg_file) + ': ')}") from None


def checkpoint_config(path: str | Path, trust_remote_code: bool = False) -> KavaConfig:
    """The config saved in checkpoint ``path`` with ``model.trust_remote_code`` set to the
    caller's ``trust_remote_code``: a checkpoint (a file anyone may have written) can never
    enable code shipped with a model by itself, only the user's command line or config can."""
    cfg_file = Path(path) / CONFIG_FILE
    cfg = _stored_config(path)
    if cfg.model.trust_remote_code and not trust_remote_code:
        log.warning(
            "%s sets model.trust_remote_code=true: ignored, a checkpoint cannot enable remote code; "
            "give model.trust_remote_code=true on the command line (or in your config) to allow the code of %s to run",
            cfg_file,
            cfg.model.name_or_path,
        )
    cfg.model.trust_remote_code = bool(trust_remote_code)
    return cfg


def _check_model_folder(folder: Path, trust_remote_code: bool = False) -> None:
    """Stop, naming the file and the tensor, where a weight file of the transformers folder
    is damaged or holds a tensor of another shape than its ``config.json`` describes (checked
    on an empty ``meta`` model: nothing is allocated); where it names code of its own
    (``auto_map``) without the user's ``trust_remote_code``, or holds pickled weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    refuse_remote_code(str(folder), trust_remote_code, "checkpoint model folder")
    refuse_pickled(folder)
    check_model_json(folder)
    files = sorted(folder.glob("model*.safetensors"))
    shapes = {f: check_readable(f) for f in files}
    try:
        with torch.device("meta"), quiet_transformers():
            mcfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            expected = {
                n: tuple(t.shape)
                for n, t in AutoModelForCausalLM.from_config(mcfg, trust_remote_code=trust_remote_code)
                .state_dict()
                .items()
            }
    except (OSError, ValueError, KeyError, *config_errors()) as e:
        raise ModelLoadError(
            f"{folder / 'config.json'}: cannot read the model's config: "
            f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}"
        ) from None
    for f, found in shapes.items():
        foreign = sorted(set(found) - set(expected))
        if foreign:  # a kava checkpoint holds the model's own tensors only
            raise ModelLoadError(
                f"{f}: tensor {foreign[0]!r} is not one of the model's ({len(foreign)} such); a damaged or foreign file"
            )
        for name, shape in found.items():
            if name in expected and expected[name] != shape:
                raise ModelLoadError(
                    f"{f}: tensor {name!r} has shape {shape} but {folder / 'config.json'} describes "
                    f"{expected[name]} (weights of another architecture?)"
                )


def _from_pretrained(folder: Path, cfg: ModelConfig):
    """A transformers model folder written by a checkpoint: safetensors only, and code of its own
    only with the user's ``model.trust_remote_code`` (never a prompt's answer)."""
    from transformers import AutoModelForCausalLM

    _check_model_folder(Path(folder), cfg.trust_remote_code)
    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=resolve_dtype(cfg.dtype),
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                use_safetensors=True,
            )
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: tensors of another shape
        raise ModelLoadError(
            f"{folder}: cannot load the model folder: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
        ) from None


def _load_adapter(model: KavaModel, path: Path) -> None:
    """The LoRA weights and trained rows of ``path``'s adapter into ``model``'s peft backbone."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if not model.is_lora:
        raise ModelLoadError(
            f"{path}: a LoRA adapter checkpoint, but its config has model.adapter={model.cfg.model.adapter!r}"
        )
    saved = read_tensors(path / ADAPTER_FILE)
    own = get_peft_model_state_dict(model.backbone, save_embedding_layers=False)
    if set(saved) != set(own):
        lost, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        raise ModelLoadError(
            f"{path / ADAPTER_FILE}: does not match the model: missing {lost[:3]}, unexpected {extra[:3]}"
        )
    for name, tensor in saved.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{path / ADAPTER_FILE}: tensor {name!r} has shape {tuple(tensor.shape)} but the model built from "
                f"the config expects {tuple(own[name].shape)} (an adapter of another rank or architecture?)"
            )
    set_peft_model_state_dict(model.backbone, saved)


def _load_base(model: KavaModel, folder: Path) -> None:
    """A base saved as ``base_model/`` into a peft-wrapped backbone, by plain names."""
    base = _from_pretrained(folder, model.cfg.model)
    plain = base.state_dict()
    live = model.backbone.state_dict()
    names = {n: w for n, w in zip(plain_base_state(live), (k for k in live if not any(p in k for p in _ADAPTER_PARTS)))}
    if set(names) != set(plain):
        raise ModelLoadError(
            f"{folder}: its tensors do not match the model's base: {sorted(set(names) ^ set(plain))[:3]}"
        )
    model.backbone.load_state_dict({names[n]: t for n, t in plain.items()}, strict=False)


def _load_own(model: KavaModel, path: Path) -> None:
    """kava's own tensors (the projection) from :data:`KAVA_WEIGHTS`."""
    expected = {n for n in model.state_dict() if not n.startswith("backbone.")}
    saved = read_tensors(path / KAVA_WEIGHTS) if (path / KAVA_WEIGHTS).is_file() else {}
    if set(saved) != expected:
        raise ModelLoadError(
            f"{path / KAVA_WEIGHTS}: does not match the model's projection: "
            f"missing {sorted(expected - set(saved))[:3]}, unexpected {sorted(set(saved) - expected)[:3]}"
        )
    check_shapes(model, saved, path / KAVA_WEIGHTS)
    model.load_state_dict(saved, strict=False)


def load_weights(model: KavaModel, path: str | Path) -> None:
    """Load checkpoint ``path`` into ``model``, built from the same config (a resume): every
    trained tensor, and the base where the checkpoint holds it."""
    path = Path(path)
    layout = checkpoint_layout(path)
    if layout == "full":
        if model.is_lora:
            raise ModelLoadError(
                f"{path}: a full model checkpoint, but the model has LoRA adapters (model.adapter=lora)"
            )
        model.backbone.load_state_dict(_from_pretrained(path, model.cfg.model).state_dict())
    else:
        if (path / BASE_DIR).is_dir():
            _load_base(model, path / BASE_DIR)
        _load_adapter(model, path)
    _load_own(model, path)


def _checkpoint_tokenizer(folder: Path, cfg: KavaConfig):
    from transformers import AutoTokenizer

    check_model_json(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, *config_errors()) as e:
        # The libraries' messages may end their first line with a colon: keep what follows it.
        first = " ".join(line.strip() for line in str(e).strip().splitlines()[:2]) or type(e).__name__
        if isinstance(e, config_errors()):  # a value of config.json of the wrong type
            raise ModelLoadError(f"{folder / 'config.json'}: cannot read the model's config: {first}") from None
        raise ModelLoadError(f"{folder}: cannot load the checkpoint's tokenizer: {first}") from None


def load_checkpoint(path: str | Path, trust_remote_code: bool = False) -> KavaModel:
    """Rebuild a :class:`KavaModel` from a checkpoint folder (a LoRA or a full one).

    ``trust_remote_code``: the caller's (the user's) permission to run code shipped with the
    base model; the checkpoint's own ``model.trust_remote_code`` is ignored
    (:func:`checkpoint_config`). Model folders a checkpoint holds never run code of their own."""
    path = Path(path)
    layout = checkpoint_layout(path)
    cfg = checkpoint_config(path, trust_remote_code)
    tok = _checkpoint_tokenizer(path, cfg)
    reloadable = cfg.model.name_or_path != "tiny" or bool(cfg.model.init_from)
    if layout == "full":
        if cfg.model.adapter != "full":
            raise ModelLoadError(
                f"{path}: a full model checkpoint, but its {CONFIG_FILE} has model.adapter={cfg.model.adapter!r}"
            )
        model = wrap_backbone(cfg, tok, _from_pretrained(path, cfg.model), reloadable)
    else:
        if (path / BASE_DIR).is_dir():
            backbone, reloadable = _from_pretrained(path / BASE_DIR, cfg.model), False
        else:
            _, backbone = start_backbone(cfg.model, cfg.train.seed)
        model = wrap_backbone(cfg, tok, backbone, reloadable)
        _load_adapter(model, path)
    _load_own(model, path)
    _refuse_non_finite(model, path)
    return model


def _refuse_non_finite(model: KavaModel, path: Path) -> None:
    """Stop, naming the tensor, where a loaded weight holds NaN or infinity: kava never saves
    one (a run stops first), so the file was damaged or written elsewhere."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ModelLoadError(f"{path}: weight {name!r} holds NaN or infinite values (a damaged checkpoint)")


def enclosing_checkpoint(path: str | Path) -> Path | None:
    """The kava checkpoint (or export: a folder with ``kava_config.yaml``) that ``path`` is or
    lies in, looking at its nearest existing folder and that folder's parents; None if none.
    Nothing kava writes may go there: it would change the checkpoint it is a part of."""
    probe = Path(path)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    for inside in (probe, *probe.resolve().parents):
        if (inside / CONFIG_FILE).is_file():
            return inside
    return None


def resolve_init_from(path: str) -> str:
    """The checkpoint ``model.init_from`` names: the folder itself when it is a checkpoint, else
    the latest ``checkpoint-N`` of a run folder (as eval, export and ``kava.load`` read one).
    A missing folder, or one without a checkpoint, stops with one line saying so."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return str(path)
    if not p.exists():
        raise ModelLoadError(
            f"model.init_from: {p} does not exist (train that run first, or give a run folder or "
            "checkpoint-N folder that exists)"
        )
    found = latest_checkpoint(p)
    if found is None:
        raise ModelLoadError(
            f"model.init_from: {p} holds no kava checkpoint (no {CONFIG_FILE}, no checkpoint-N folder "
            "with a trainer state: has its run saved one yet?)"
        )
    return str(found)


def check_init_from(cfg: ModelConfig) -> None:
    """Resolve ``model.init_from`` to the checkpoint it names (:func:`resolve_init_from`; the
    run's config then records that checkpoint), and stop, naming the field, when it holds
    another architecture than the run's config describes: the run would train the checkpoint's
    model while its ``config.yaml`` recorded a different one."""
    resolved = resolve_init_from(cfg.init_from)
    if resolved != cfg.init_from:
        log.info("model.init_from: %s -> its latest checkpoint %s", cfg.init_from, resolved)
        cfg.init_from = resolved
    path = Path(cfg.init_from)
    theirs = _stored_config(path).model
    diff = architecture_differences(cfg, theirs)
    if diff:
        field, mine, other = diff[0]
        raise ModelLoadError(
            f"model.init_from: checkpoint {path} has {field}={other!r} but this run's config has {mine!r}; "
            f"set {field}={other} (or start from a checkpoint of this architecture)"
        )


def start_backbone(cfg: ModelConfig, seed: int = 0):
    """(tokenizer, causal LM) a run starts from: ``model.init_from``'s checkpoint with any LoRA
    merged in (checked against the run's architecture, :func:`check_init_from`), else the base
    model :func:`~kava.model.backbone.load_backbone` reads."""
    if not cfg.init_from:
        return load_backbone(cfg, seed)
    check_init_from(cfg)
    # The checkpoint's own config never enables remote code: only this run's value does.
    model = load_checkpoint(cfg.init_from, trust_remote_code=cfg.trust_remote_code)
    return model.tokenizer, model.merged_backbone()


def build_model(cfg: KavaConfig, with_adapter: bool = True) -> KavaModel:
    """A run's model: the backbone it starts from (:func:`start_backbone`) with the latent
    tokens added and LoRA or full fine-tuning applied (:func:`~kava.model.backbone.wrap_backbone`)."""
    tok, backbone = start_backbone(cfg.model, cfg.train.seed)
    base_reloadable = cfg.model.name_or_path != "tiny" or bool(cfg.model.init_from)
    return wrap_backbone(cfg, tok, backbone, base_reloadable, with_adapter)
