"""lm-evaluation-harness's model "dern-stream": a checkpoint scored with the streamed forward, never loaded whole.

Importing this module registers the model with lm-eval (`lm_eval.simple_evaluate(model="dern-stream",
model_args="pretrained=CKPT")`). Tokenization, the context/continuation split, left-truncation, BOS handling,
rolling windows and is_greedy are lm-eval's HFLM's, from lm-eval's own functions where it exports them, so the
numbers mean the same (docs/evaluation.md). Requests that generate text are refused: generation needs every
layer for every new token, which a layer-at-a-time forward cannot give.
"""

from __future__ import annotations

import os
from pathlib import Path

from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix, resolve_max_length

from ..checkpoint import Checkpoint, resolve_checkpoint
from ..errors import DernError
from ..layout.moe_layers import check_forward_model
from ..runtime.device import resolve_device
from ..runtime.optional_packages import require_transformers
from ..stream import StreamedModel
from ..stream.executor import parse_dtype
from .continuation_scores import ContinuationScorer

MODEL_NAME = "dern-stream"
DEFAULT_BATCH_SIZE = 8


@register_model(MODEL_NAME)
class StreamedLM(TemplateLM):
    """See the module doc. `model_args`: pretrained (a directory or Hub repo id), revision, tokenizer, device,
    dtype, batch_size, max_length, add_bos_token, prefix_token_id, trust_remote_code and use_fast_tokenizer (for the
    tokenizer, as HFLM takes them), hidden_placement (device, host or disk: where the hidden states wait between
    layers; by default the first of them they fit in), scratch_dir."""

    backend = "causal"

    def __init__(self, pretrained: str | os.PathLike, revision: str | None = None,
                 tokenizer: str | os.PathLike | None = None, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 max_length: int | None = None, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 hidden_placement: str | None = None, scratch_dir: str | os.PathLike | None = None,
                 trust_remote_code: bool = False, use_fast_tokenizer: bool = True, progress: bool = True,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise DernError(f"model {MODEL_NAME} takes no argument(s) {', '.join(sorted(unknown))} (it takes "
                            "pretrained, revision, tokenizer, device, dtype, batch_size, max_length, add_bos_token, "
                            "prefix_token_id, hidden_placement, scratch_dir, trust_remote_code, use_fast_tokenizer)")
        if hidden_placement not in (None, "device", "host", "disk"):
            raise DernError(f"hidden_placement must be device, host or disk, not {hidden_placement!r}")
        transformers = require_transformers("the dern-stream lm-eval model needs")
        ckpt = Checkpoint(resolve_checkpoint(str(pretrained), revision))
        check_forward_model(ckpt)
        self.checkpoint = str(ckpt.root)
        self.model = StreamedModel(ckpt, resolve_device(device or "auto"), parse_dtype(str(dtype)))
        self._device = self.model.device
        self.add_bos_token = add_bos_token
        # As HFLM loads it: the tokenizer's remote code only where lm-eval's --trust_remote_code asks for it
        kwargs = {"revision": revision, "trust_remote_code": bool(trust_remote_code),
                  "use_fast": bool(use_fast_tokenizer)}
        if add_bos_token is not None:
            kwargs["add_bos_token"] = add_bos_token
        if tokenizer is None:
            kwargs.pop("revision")  # (the checkpoint's own folder, already at that revision)
        source = tokenizer if tokenizer is not None else ckpt.root
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        except Exception as e:  # OSError for a missing file, ValueError for an unknown class, ...
            raise DernError(f"cannot load a tokenizer from {source}: {str(e).splitlines()[0] if str(e) else e}") \
                from None
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = int(max_length) if max_length else resolve_max_length(self.model.text_config,
                                                                                   self.tokenizer)
        self.batch_size = _batch_size(batch_size)
        self.progress = progress
        self.on_plan = None  # called with the ScoringPlan before each streamed pass (eval --tasks prints it)
        self.scorer = ContinuationScorer(self.model, self._max_length, self.batch_size, hidden_placement,
                                         Path(scratch_dir).expanduser() if scratch_dir else None)

    # --- lm-eval's HFLM conventions ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    # --- the requests -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm, "loglikelihood: layers")
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, summed over HFLM's disjoint windows; all windows of all texts in one pass."""
        windows, owner = [], []
        for n, (string,) in enumerate(r.args for r in requests):
            for ctx, cont in map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(n)
        scores = self._score(windows, disable_tqdm, "loglikelihood_rolling: layers")
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, scores, strict=True):
            totals[n] += ll
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def _score(self, pairs: list, disable_tqdm: bool, desc: str) -> list[tuple[float, bool]]:
        if self.on_plan is not None and pairs:
            self.on_plan(self.scorer.plan(pairs))
        return self.scorer.score(pairs, progress=self.progress and not disable_tqdm, desc=desc)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise DernError("the dern-stream model scores log-likelihoods only: tasks that generate text "
                        "(generate_until) need every layer for each new token")

    def get_model_info(self) -> dict:
        return {"model_name": self.checkpoint, "model_num_parameters": None, "model_dtype": str(self.model.dtype)}


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes the batch size as given (an int, a numeric string, or "auto"); "auto" and None mean the
    default: the streamed forward holds one batch's activations at a time, so there is no memory to probe."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise DernError(f"batch_size must be a positive integer or auto, not {value!r}") from None
    if size < 1:
        raise DernError(f"batch_size must be a positive integer, not {size}")
    return size


def lm_eval_main() -> None:
    """`dern-stream-lm-eval ARGS`: lm-eval's own command line (`run --model dern-stream --model_args
    pretrained=CKPT ...`) with this model registered. lm-eval 0.4 finds models only in its own table or among the
    modules already imported, so its `lm_eval` command cannot see this one."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except DernError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    lm_eval_main()
