"""The lmms-eval model class `qwen2vl_jax` (see evaluation/lmms/__init__.py for install, command and model_args)."""
from __future__ import annotations

from lmms_eval.api.model import lmms
from tqdm import tqdm

from evaluation.lmms.requests import DEFAULT_MAX_NEW_TOKENS, Generator


def _mesh_arg(value) -> str:
    """model_args' mesh: lmms-eval splits model_args at commas, so several axes come ';'-separated or quoted."""
    return str(value).strip().strip("'\"").replace(";", ",")


class Qwen2VLJax(lmms):
    """Qwen2-VL in JAX for lmms-eval: generate_until through generate_many on a device mesh."""

    is_simple = True

    def __init__(self, checkpoint: str, mesh: str = "data=-1", dtype: str | None = None, batch_size=None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, system_prompt: str | None = None, seed: int = 0,
                 compile_cache: str | None = None, device=None, max_batch_size=None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"qwen2vl_jax: unknown model_args {sorted(kwargs)}; see evaluation/lmms/__init__.py")
        from evaluation.serving import open_model
        from qwen2vl_jax.compiles import cache_from_flag
        from qwen2vl_jax.processing import Processor

        if batch_size in (None, "", "auto") or str(batch_size).startswith("auto"):
            batch_size = 8
        # process-lifetime: lmms-eval has no close hook; the cache only changes JAX's cache settings
        self.compile_cache = cache_from_flag(None if compile_cache is None else str(compile_cache)).open()
        self.processor = Processor.from_pretrained(str(checkpoint))
        self.model = open_model(str(checkpoint), _mesh_arg(mesh), dtype or None)
        self.generator = Generator(self.processor, self.model, batch_size=int(batch_size),
                                   max_new_tokens=int(max_new_tokens),
                                   system_prompt=self._resolve_system_prompt(system_prompt) if system_prompt else None,
                                   seed=int(seed))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """model_args win over lmms-eval's own --batch_size/--device (passed as additional_config): the base class
        would pass a batch_size given in both twice."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.generator.batch_size

    def generate_until(self, requests) -> list[str]:
        with tqdm(total=len(requests), disable=self.rank != 0, desc="qwen2vl_jax responding") as bar:
            answers = self.generator.generate_until(requests, self.task_dict, progress=bar.update)
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), answer)
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "qwen2vl_jax serves generate_until only: loglikelihood (multiple-choice-by-likelihood tasks) is not "
            "implemented; pick the task's generation variant")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("qwen2vl_jax does not implement generate_until_multi_round")
