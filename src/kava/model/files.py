"""Reading weight files safely: safetensors only (nothing is unpickled), model folders that
ship code of their own refused unless the user allowed it, and the one error every loading
problem is reported as (:class:`ModelLoadError`, whose message names the file)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path


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
    raise ModelLoadError(
        f"{pickled[0]}: a pickled weights file; kava never unpickles (it can run code). Convert it to "
        "safetensors where you trust it (AutoModelForCausalLM.from_pretrained(DIR)"
        ".save_pretrained(DIR, safe_serialization=True), or safetensors.torch.save_file), "
        "then remove it"
    )


# The JSON files of a transformers model folder; the libraries reading them raise bare KeyErrors
# and type errors on a damaged one, so each is checked here first.
MODEL_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "adapter_config.json",
)
MAX_JSON_BYTES = 256 << 20


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def check_model_json(folder: str | Path) -> None:
    """Stop, naming the file, where a JSON file of the model folder ``folder`` is unreadable,
    not an object, holds NaN/Infinity, or (``tokenizer.json``) lacks what a tokenizer file has."""
    folder = Path(folder)
    for name in MODEL_JSON_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if path.stat().st_size > MAX_JSON_BYTES:
                raise ValueError(f"{path.stat().st_size:,} bytes, more than {MAX_JSON_BYTES:,}")
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            problem = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
            raise ModelLoadError(f"{path}: not a readable JSON file ({problem})") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
        if name == "tokenizer.json" and not (
            isinstance(data.get("model"), dict) and isinstance(data.get("added_tokens"), list)
        ):
            raise ModelLoadError(f"{path}: not a tokenizer file (no 'model' object or 'added_tokens' list)")


def config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises on a config.json whose values have the wrong type (besides
    ValueError): huggingface_hub's strict-dataclass errors, where that version has them."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


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
    """The tensor shapes of the model weight file ``path``, from its header only (a check before
    a library loads the file itself); stop, naming ``path``, when it is missing, empty,
    truncated or corrupted, or when a tensor holds integers or booleans (model weights are
    floating point; a loader would cast them silently)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes, dtypes = {}, {}
            for name in f.keys():
                part = f.get_slice(name)
                shapes[name], dtypes[name] = tuple(part.get_shape()), str(part.get_dtype())
    except (SafetensorError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{path}: not a readable safetensors file, truncated or corrupted ({first})") from None
    for name, dtype in dtypes.items():
        if not dtype.upper().startswith(("F", "BF")):  # F16, F32, F64, F8_*, BF16
            raise ModelLoadError(f"{path}: tensor {name!r} holds {dtype} values; model weights are floating point")
    return shapes


def check_shapes(module, state: dict, source: Path) -> None:
    """Stop, naming ``source`` and the tensor, where a tensor of ``state`` has another shape
    than ``module``'s tensor of that name (``load_state_dict`` would raise a long traceback), or
    integer or boolean values where the model holds floating-point weights (``load_state_dict``
    would cast them silently)."""
    own = module.state_dict()
    for name, tensor in state.items():
        mine = own.get(name)
        if mine is not None and tuple(mine.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the model built from the "
                f"config expects {tuple(mine.shape)} (weights of another architecture?)"
            )
        if mine is not None and mine.is_floating_point() and not tensor.is_floating_point():
            raise ModelLoadError(
                f"{source}: tensor {name!r} holds {str(tensor.dtype).removeprefix('torch.')} values where the model "
                f"has {str(mine.dtype).removeprefix('torch.')} weights (a damaged or foreign weight file?)"
            )


def ships_code(path: str) -> bool:
    """Whether the local model folder ``path`` names code of its own (``auto_map``)."""
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(path) / name
        try:
            if f.is_file() and "auto_map" in json.loads(f.read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError):
            continue
    return False


def refuse_remote_code(path: str, trust_remote_code: bool, what: str = "model.name_or_path") -> None:
    """Stop before transformers is asked (it would prompt "run the custom code? [y/N]" in a
    terminal) when the local folder ``path`` names code of its own and the user did not allow it."""
    if not trust_remote_code and ships_code(path):
        raise ModelLoadError(
            f"{what}: {path} ships its own code (auto_map in its config), which runs only with "
            "model.trust_remote_code=true given on the command line or in your config "
            "(never from a checkpoint's saved config)"
        )


@contextmanager
def quiet_transformers():
    """No transformers progress bars ("Loading weights", "Writing model shards") inside."""
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()
