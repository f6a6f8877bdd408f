"""Checkpoint folders: the files a checkpoint holds, finding a run's latest one, and the
error for a model or checkpoint that cannot be loaded.

A checkpoint ``checkpoint-N/`` is a standard folder others can open, with kava's own parts
beside it (:meth:`kava.model.KavaModel.save` writes it, :func:`kava.model.load_checkpoint`
reads it):

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

Checkpoints written before this layout (every trained tensor under kava's own names in
``model.safetensors``, the tokenizer in ``tokenizer/``, no ``config.json``) still load.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "kava_config.yaml"
WEIGHTS_FILE = "model.safetensors"  # full fine-tuning: the transformers weights (old layout: every kava tensor)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
KAVA_WEIGHTS = "kava_model.safetensors"
BASE_DIR = "base_model"
OLD_TOKENIZER_DIR = "tokenizer"
STATE_TENSORS = "kava_trainer_state.safetensors"
STATE_JSON = "kava_trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LAYOUTS = ("lora", "full", "old")


class ModelLoadError(RuntimeError):
    """A model or checkpoint that cannot be loaded; the message names it."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled(folder: str | Path, only_if_no_safetensors: bool = False) -> None:
    """Stop, naming the file, where ``folder`` holds a pickled weights file (``pytorch_model.bin``,
    ``.pt``, ...): kava never unpickles (unpickling can run code). ``only_if_no_safetensors``: a
    plain model folder may keep a ``.bin`` beside its safetensors (those are what is loaded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickled or (only_if_no_safetensors and any(folder.glob("*.safetensors"))):
        return
    raise ModelLoadError(f"{pickled[0]}: a pickled weights file; kava never unpickles (it can run code). Convert it to "
                         "safetensors where you trust it (AutoModelForCausalLM.from_pretrained(DIR)"
                         ".save_pretrained(DIR, safe_serialization=True), or safetensors.torch.save_file), "
                         "then remove it")


def checkpoint_layout(path: str | Path) -> str:
    """``lora`` (a peft adapter folder), ``full`` (a transformers model folder) or ``old`` (the
    layout before standard folders) for a kava checkpoint folder; anything else is an error, and
    so is a pickled file in it (:func:`refuse_pickled`)."""
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
    if (path / WEIGHTS_FILE).is_file():
        return "old"
    raise ModelLoadError(f"{path}: not a kava checkpoint (needs {ADAPTER_CONFIG}, config.json or {WEIGHTS_FILE} beside {CONFIG_FILE})")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint's model (adapter, model shards, ``base_model/``,
    kava's own tensors; not the trainer state nor other teachers' adapters), sorted."""
    path = Path(path)
    found = [path / ADAPTER_FILE, path / KAVA_WEIGHTS, *path.glob("model*.safetensors"), *(path / BASE_DIR).glob("model*.safetensors")]
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
        raise ModelLoadError(f"{newest} is a symbolic link; kava does not follow links inside a run folder "
                             "(give the checkpoint it points to with --checkpoint, or replace the link by the folder)")
    if newest.is_dir() and (newest / CONFIG_FILE).is_file() and (newest / STATE_JSON).is_file():
        return newest
    missing = CONFIG_FILE if not (newest / CONFIG_FILE).is_file() else STATE_JSON
    older = [p for _, p in found[:-1]
             if not p.is_symlink() and (p / CONFIG_FILE).is_file() and (p / STATE_JSON).is_file()]
    alt = f"the newest complete one is {older[-1].name}: give it explicitly, or move {newest.name} away" if older \
        else "no older complete checkpoint exists"
    raise ModelLoadError(f"{newest}: incomplete or damaged checkpoint (no {missing}); not falling back silently: {alt}")


def read_tensors(path: Path) -> dict:
    """The tensors of the safetensors file ``path``; a missing, empty, truncated or corrupted
    file raises :class:`ModelLoadError` naming it (never a traceback from the reader)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{path}: not a readable safetensors file, truncated or corrupted ({first})") from None


def check_readable(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of safetensors file ``path``, from its header only (a check before a
    library loads the file itself); stop, naming ``path``, when it is missing, empty,
    truncated or corrupted."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{path}: not a readable safetensors file, truncated or corrupted ({first})") from None


def check_shapes(module, state: dict, source: Path) -> None:
    """Stop, naming ``source`` and the tensor, where a tensor of ``state`` has another shape
    than ``module``'s tensor of that name (``load_state_dict`` would raise a long traceback)."""
    own = module.state_dict()
    for name, tensor in state.items():
        mine = own.get(name)
        if mine is not None and tuple(mine.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the model built from the "
                                 f"config expects {tuple(mine.shape)} (weights of another architecture?)")
