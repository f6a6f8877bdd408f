import pytest
import torch

from kava.config import KavaConfig, config_from_dict


def tiny_config(**sections) -> KavaConfig:
    """A small, fast configuration on the synthetic task; ``sections`` override per section."""
    base = {
        "model": {
            "name_or_path": "tiny",
            "adapter": "full",
            "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64},
        },
        "latent": {"num_latents": 3, "iterations": 2, "scheme": "jacobi"},
        "loss": {"compression": "rkv"},
        "data": {"synthetic_ops": 3, "synthetic_train_size": 64, "synthetic_test_size": 16},
        "train": {
            "batch_size": 4,
            "max_steps": 4,
            "lr": 1e-3,
            "progress": False,
            "log_every": 1,
            "eval_at_end": False,
            "warmup_ratio": 0.0,
        },
        "eval": {"batch_size": 8, "max_new_tokens": 6, "max_cot_tokens": 40},
    }
    for name, values in sections.items():
        base.setdefault(name, {})
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(base[name].get(k), dict):
                base[name][k] = {**base[name][k], **v}
            else:
                base[name][k] = v
    return config_from_dict(base)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield
