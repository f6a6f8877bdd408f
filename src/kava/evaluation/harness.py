"""A model adapter for EleutherAI's lm-evaluation-harness: ``--model kava``.

    kava lm-eval --model kava --model_args pretrained=runs/tiny/kava --tasks gsm8k_cot_zeroshot

runs the harness with kava's latent-mode generation on any ``generate_until`` task. The
harness finds a model by name in its registry; importing this module registers ``kava``
there (``lm_eval`` 0.4 discovers no models through entry points), which ``kava lm-eval``
does before it hands every argument to the harness's own command line. From Python, pass
``KavaLM(pretrained=...)`` as ``model`` to ``lm_eval.simple_evaluate``.

``model_args``: ``pretrained`` (a checkpoint or run folder: lm-eval's own name for the model
argument, from which it names its result folders), ``mode`` (``latent``, ``cot``,
``nocot``; default ``latent``), ``answer_prefix`` (true: a reply in latent and no-CoT mode
starts with the checkpoint's ``data.answer_prefix``, which the model read as the end of its
prompt, so "The answer is" filters match; false: the generated tokens alone), ``grader``.
Each request's context is the question (it goes through the checkpoint's
``data.question_template``); ``until`` cuts the reply, ``max_gen_toks`` caps it. Decoding
is greedy; a request asking to sample is refused. Log-likelihood requests are not
supported: latent reasoning produces an answer by generating it.
"""

from __future__ import annotations

import logging
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .inference import MODE_NAMES, load

log = logging.getLogger("kava.lm_eval")


def _flag(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"kava lm-eval adapter: expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)


@register_model("kava")
class KavaLM(LM):
    """kava checkpoints in lm-evaluation-harness (``generate_until`` tasks)."""

    def __init__(
        self,
        pretrained: str | None = None,
        mode: str = "latent",
        answer_prefix=True,
        grader: str = "strict",
        batch_size=None,
        device: str | None = None,
        max_batch_size=None,
        trust_remote_code=False,
        **unused,
    ):
        super().__init__()
        if not pretrained:
            raise ValueError("the kava model needs --model_args pretrained=DIR (a kava checkpoint or run folder)")
        if unused:
            raise ValueError(
                f"kava model: unknown model_args {', '.join(sorted(unused))}; "
                "known: pretrained, mode, answer_prefix, grader, batch_size, device, trust_remote_code"
            )
        if mode not in MODE_NAMES:
            raise ValueError(f"kava model: mode={mode!r}; choose from latent, cot, nocot")
        import torch

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's default device is cuda; its own hf model falls back to the CPU the same way.
            log.warning("device %s requested but no CUDA device is visible: running on the CPU", device)
            device = "cpu"
        self.reasoner = load(str(pretrained), device, grader, trust_remote_code=_flag(trust_remote_code))
        self.mode = mode
        self.answer_prefix = _flag(answer_prefix)
        size = str(batch_size) if batch_size is not None else "auto"
        self.batch_size = self.reasoner.cfg.eval.batch_size if size.startswith("auto") else int(size)

    def _reply(self, answer, until: list[str]) -> str:
        generation = answer.generation
        for stop in until:
            if stop and stop in generation:
                generation = generation[: generation.index(stop)]
        if self.answer_prefix and MODE_NAMES[self.mode] != "cot":
            return self.reasoner.cfg.data.answer_prefix + generation
        return generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        replies: list[str | None] = [None] * len(requests)
        groups: dict[int | None, list[int]] = {}  # requests with the same token cap are batched together
        for i, req in enumerate(requests):
            gen_kwargs = dict(req.args[1] or {})
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError(
                    "kava model: decoding is greedy; set do_sample: false and temperature: 0 in the task's "
                    "generation_kwargs"
                )
            groups.setdefault(gen_kwargs.get("max_gen_toks"), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="kava generate_until")
        for cap, idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                answers = self.reasoner.answer(
                    [requests[i].args[0] for i in chunk], self.mode, self.batch_size, int(cap) if cap else None
                )
                for i, a in zip(chunk, answers):
                    until = requests[i].args[1].get("until") or []
                    replies[i] = self._reply(a, [until] if isinstance(until, str) else list(until))
                    self.cache_hook.add_partial("generate_until", requests[i].args, replies[i])
                bar.update(len(chunk))
        bar.close()
        return replies

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "the kava model answers generate_until tasks only (latent reasoning generates its answer); "
            "for log-likelihood tasks evaluate the exported folder (kava export) with --model hf"
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "the kava model answers generate_until tasks only; for perplexity evaluate the exported folder with "
            "--model hf"
        )


def run_cli(argv: list[str]) -> int:
    """lm-evaluation-harness's command line with ``kava`` registered (``kava lm-eval ARGS``)."""
    import lm_eval.models  # noqa: F401  (the harness's own models, registered lazily, stay available)
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
