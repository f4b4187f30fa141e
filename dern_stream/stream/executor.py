"""The streamed forward: every batch goes through decoder layer L before layer L+1 is read, so each
layer's weights are read from disk once and only one layer is ever materialised.

The skeleton is the model transformers builds from config.json, on the meta device (no weights
allocated). Its own forward computes what the decoder layers receive (embeddings, rotary
position embeddings, attention masks): we run it once per batch shape with the layers swapped for
recorders, so each family's conventions come from transformers itself, not from a copy here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch

from ..checkpoint import Checkpoint
from ..checkpoint.safetensors_format import DTYPES, FLOAT_DTYPES
from ..errors import DernError
from ..families import Family, family_for, require_forward
from ..runtime.arguments import check_dtype_name
from ..runtime.host_memory import return_freed_memory
from ..runtime.optional_packages import require_transformers
from ..storage.tensor_kinds import check_fp8_tensors
from .hidden_store import HiddenStore
from .weights import materialise, release

_LOGIT_BLOCK_BYTES = 256 << 20  # lm_head logits are computed in row blocks of at most this size


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer i during the embedding pass: records the call's keyword arguments."""

    def __init__(self, index: int, attention_type: str | None, sink: dict, passes_top_k: bool = False,
                 positional: tuple[str, ...] = ()):
        super().__init__()
        self.index, self.sink, self.passes_top_k, self.positional = index, sink, passes_top_k, positional
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if len(args) > len(self.positional):
            raise DernError("this transformers version passes decoder layers positional arguments; "
                            "the streamed forward does not support it")
        # (Gemma 4 passes its per-layer input second: recorded by the name the layer's forward gives it)
        kwargs.update(zip(self.positional, args, strict=False))
        self.sink[self.index] = (hidden_states, kwargs)
        # GLM-5's decoder layers return (hidden states, the indexer's top-k), which the next layer receives
        return (hidden_states, kwargs.get(_PREV_TOP_K)) if self.passes_top_k else hidden_states


_PREV_TOP_K = "prev_topk_indices"


def _positional_names(layer: torch.nn.Module) -> tuple[str, ...]:
    """The names of a decoder layer's forward arguments after its hidden states, that may be passed by position."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(type(layer).forward).parameters.values() if p.kind in kinds]
    return tuple(names[2:])  # (self, hidden_states)


def _passes_top_k(layer: torch.nn.Module) -> bool:
    """A decoder layer that hands its sparse-attention top-k to the next one (GLM-5): it takes `prev_topk_indices`."""
    import inspect

    return _PREV_TOP_K in inspect.signature(type(layer).forward).parameters


def _cannot_build(model_type: str, e: BaseException) -> DernError:
    """One line for an exception transformers raised while building the model from config.json."""
    message = " ".join(str(e).split())
    if not type(e).__name__.startswith("StrictDataclass"):  # those name the field and the type themselves
        message = f"{type(e).__name__}: {message}" if message else type(e).__name__
    if len(message) > 300:
        message = message[:297] + "..."
    return DernError(f"config.json cannot build a {model_type} model in transformers: {message}")


class StreamedModel:
    """A causal LM whose weights stay on disk until a layer is run. See the module doc."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype | None = None):
        transformers = require_transformers()
        AutoConfig, AutoModelForCausalLM = transformers.AutoConfig, transformers.AutoModelForCausalLM  # noqa: N806

        self.ckpt, self.device = ckpt, device
        self.family = family_for(ckpt.config)  # checks config.json's value types (families/config_check.py)
        require_forward(self.family)
        check_fp8_tensors(ckpt)
        try:
            if ckpt.config.get("model_type") == self.family.model_type:
                config = AutoConfig.from_pretrained(ckpt.root)
            else:  # a model_type of its own naming this family's class (Kimi-K2): built as that family
                config = AutoConfig.for_model(self.family.model_type, **{
                    k: v for k, v in ckpt.file_config.items() if k not in ("model_type", "auto_map", "architectures")})
        except OSError as e:
            raise DernError(f"transformers cannot read {ckpt.root / 'config.json'}: {str(e).splitlines()[0]}") from None
        except Exception as e:  # the config class's own validation: strict dataclass errors, ValueError...
            raise _cannot_build(self.family.model_type, e) from None
        self.dtype = dtype or _stored_dtype(ckpt, self.family)
        try:
            config.dtype = self.dtype
            with torch.device("meta"):
                # (a multimodal model: its own class, whose language model runs)
                auto = transformers.AutoModelForMultimodalLM if self.family.multimodal else AutoModelForCausalLM
                self.model = auto.from_config(config)
            self.model.eval().requires_grad_(False)
            # The decoder stack, whose layers the family names (DBRX: transformer, blocks; Qwen3-Omni-MoE's thinker:
            # model.language_model, layers)
            self.prefix, self.layers_name = self.family.layers_in_memory.rsplit(".", 1)
            self.base = self.model.get_submodule(self.prefix)
            self.layers = getattr(self.base, self.layers_name)
            self.text_config = self.model.config.get_text_config()
            # The lm_head and its own name (a multimodal model's may sit under its language model's, or beside it:
            # Qwen3-Omni-MoE's thinker.lm_head, which its top-level model does not return)
            self.head = self.model.get_output_embeddings()
            if self.head is None:
                self.head = _nearest_lm_head(self.model, self.prefix)
            self.head_prefix = next(n for n, m in self.model.named_modules() if m is self.head) + "."
            # The final norm: `norm`, or LFM2-MoE's `embedding_norm` (applied after the last layer, despite its name).
            self.final_norm_name = next(n for n in _FINAL_NORMS if isinstance(getattr(self.base, n, None),
                                                                              torch.nn.Module))
            self.num_layers = len(self.layers)  # (LongCat-Flash: num_hidden_layers counts its attention sublayers)
        except DernError:
            raise
        except Exception as e:  # whatever the modelling code trips over: TypeError, ZeroDivisionError, ...
            raise _cannot_build(self.family.model_type, e) from None
        self._real_buffers()
        self.materialised = 0  # parameter elements currently off the meta device (tests count them)
        self._contexts: dict[tuple[int, ...], dict[int, dict]] = {}

    def _real_buffers(self) -> None:
        """Non-persistent buffers (rotary frequencies, Gemma's embedding scale) are computed, not stored: allocate them
        and let transformers' own initialiser fill them, as from_pretrained does. Weights beside them stay on the meta
        device (read when their module runs, the buffers then kept: stream/weights.py), so the initialiser never
        allocates them (Gemma 4's embedding: 1.5 GB)."""
        for module in self.model.modules():
            computed = [n for n, b in module.named_buffers(recurse=False)
                        if b is not None and n in module._non_persistent_buffers_set]
            if not computed:
                continue
            if any(True for _ in module.parameters(recurse=False)):
                for name in computed:
                    module._buffers[name] = torch.empty_like(module._buffers[name], device=self.device)
            else:
                module.to_empty(device=self.device)
            self.model._init_weights(module)

    # --- materialising parts ------------------------------------------------------------------
    @contextmanager
    def loaded(self, module: torch.nn.Module, prefix: str, layer: int | None = None) -> Iterator[torch.nn.Module]:
        """`module` with real weights from the checkpoint for the duration of the block."""
        count = materialise(module, prefix, self.ckpt, self.family, layer, self.device)
        self.materialised += count
        try:
            yield module
        finally:
            release(module)
            self.materialised -= count
            self.ckpt.release()  # mapped pages read for this part leave RSS too
            return_freed_memory()

    @property
    def final_norm(self) -> torch.nn.Module:
        return getattr(self.base, self.final_norm_name)

    def decoder_prefix(self, i: int) -> str:
        return f"{self.prefix}.{self.layers_name}.{i}."

    def moe_block(self, i: int) -> torch.nn.Module:
        block = moe_block_of(self.layers[i])
        if block is None:
            raise DernError(f"decoder layer {i} has no MoE block")
        return block

    @contextmanager
    def loaded_moe_block(self, i: int) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Decoder layer i's MoE computation with real weights for the block: x -> moe_block_output(layer, x)."""
        layer, block = self.layers[i], self.moe_block(i)
        with ExitStack() as parts:
            for name, child in layer.named_children():
                if child is block or (name in _LAYER_MOE_PARTS and block is getattr(layer, "experts", None)):
                    parts.enter_context(self.loaded(child, f"{self.decoder_prefix(i)}{name}.", layer=i))
            yield lambda x: moe_block_output(layer, x)

    # --- the forward --------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, batches: list[torch.Tensor], store: HiddenStore) -> None:
        """Layer 0's input for every batch into `store` (and each layer's call arguments per batch shape)."""
        embed = self.family.embed
        with self.loaded(getattr(self.base, embed), f"{self.prefix}.{embed}."):
            for b, ids in enumerate(batches):
                store[b] = self._record(input_ids=ids.to(self.device))

    def forget_shapes(self) -> None:
        """Drop the layer arguments recorded for each batch shape (they hold masks and positions per shape)."""
        self._contexts.clear()

    @torch.no_grad()
    def prepare(self, batches: list[torch.Tensor]) -> None:
        """Only the layers' call arguments (resuming from saved hidden states): no embeddings are read."""
        hidden = int(self.text_config.hidden_size)
        for ids in batches:
            if tuple(ids.shape) not in self._contexts:
                self._record(inputs_embeds=torch.zeros(*ids.shape, hidden, dtype=self.dtype, device=self.device))

    def _record(self, **inputs) -> torch.Tensor:
        """Run the skeleton's own forward with recorders for layers; returns layer 0's input."""
        recorded: dict[int, tuple] = {}
        recorders = torch.nn.ModuleList(
            _Recorder(i, getattr(layer, "attention_type", None), recorded, _passes_top_k(layer),
                      _positional_names(layer))
            for i, layer in enumerate(self.layers)
        )
        layers, norm = self.layers, self.final_norm
        setattr(self.base, self.layers_name, recorders)
        setattr(self.base, self.final_norm_name, torch.nn.Identity())
        try:
            self.base(**inputs, use_cache=False)
        finally:
            setattr(self.base, self.layers_name, layers)
            setattr(self.base, self.final_norm_name, norm)
        first = recorded[0][0]
        # Same shape, same positions and masks (sequences are packed, never padded).
        self._contexts.setdefault(tuple(first.shape[:2]), {i: kwargs for i, (_, kwargs) in recorded.items()})
        return first

    @torch.no_grad()
    def run_layer(self, i: int, batches: list[torch.Tensor], store: HiddenStore,
                  on_moe_input: Callable[[int, torch.Tensor], None] | None = None,
                  moe_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Decoder layer i over every batch, in place in `store`. `on_moe_input(batch, x)` receives the
        input of the layer's MoE block (the router's input), when it has one; `moe_output(x, y)` replaces
        the block's output y on input x (the sequential rewrite puts a compressed layer in this way)."""
        layer = self.layers[i]
        hooks = []
        if on_moe_input is not None:
            hooks.append(self.moe_block(i).register_forward_pre_hook(
                lambda _m, args: on_moe_input(current[0], args[0])))
        if moe_output is not None:
            hooks.append(self.moe_block(i).register_forward_hook(
                lambda _m, args, out: _replace_first(out, moe_output(args[0], _first(out)))))
        current = [0]
        try:
            with self.loaded(layer, self.decoder_prefix(i), layer=i):
                for b, ids in enumerate(batches):
                    current[0] = b
                    out = layer(store[b], **self._contexts[tuple(ids.shape)][i])
                    store[b] = out[0] if isinstance(out, tuple) else out
        finally:
            for hook in hooks:
                hook.remove()

    @contextmanager
    def _loaded_before_moe(self, i: int, block: torch.nn.Module) -> Iterator[None]:
        """Decoder layer i with real weights in all but its MoE block (never run by moe_inputs), or whole when the
        layer holds weights of its own beside its submodules."""
        layer = self.layers[i]
        if any(True for _ in layer.parameters(recurse=False)) or any(True for _ in layer.buffers(recurse=False)):
            with self.loaded(layer, self.decoder_prefix(i), layer=i):
                yield
            return
        with ExitStack() as parts:
            for name, child in layer.named_children():
                if child is not block:
                    parts.enter_context(self.loaded(child, f"{self.decoder_prefix(i)}{name}.", layer=i))
            yield

    @torch.no_grad()
    def moe_inputs(self, i: int, batches: list[torch.Tensor], store: HiddenStore) -> list[torch.Tensor]:
        """The input of decoder layer i's MoE block for every batch, [tokens, hidden] each; `store` is left
        as it was (the layer runs up to its MoE block only)."""
        captured: list[torch.Tensor] = []

        def capture(_m, args):
            captured.append(args[0].reshape(-1, args[0].shape[-1]))
            raise _ReachedMoE

        block = self.moe_block(i)
        hook = block.register_forward_pre_hook(capture)
        try:
            with self._loaded_before_moe(i, block):
                for b, ids in enumerate(batches):
                    try:
                        self.layers[i](store[b], **self._contexts[tuple(ids.shape)][i])
                    except _ReachedMoE:
                        continue
                    raise DernError(f"decoder layer {i} did not call its MoE block")
        finally:
            hook.remove()
        return captured

    @torch.no_grad()
    def nll(self, batches: list[torch.Tensor], store: HiddenStore) -> tuple[float, int]:
        """Summed next-token negative log-likelihood (float64) and the number of predicted tokens."""
        total, count = 0.0, 0
        for logits, targets in self.logit_blocks(batches, store):
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double().item()
            count += targets.numel()
        return total, count

    @contextmanager
    def _output_loaded(self) -> Iterator[torch.nn.Module]:
        """The final norm and the lm_head with real weights for the block; yields the lm_head."""
        head = self.head
        norm = f"{self.prefix}.{self.final_norm_name}."
        with self.loaded(self.final_norm, norm), self.loaded(head, self.head_prefix):
            yield head

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    @torch.no_grad()
    def logit_blocks(self, batches: list[torch.Tensor], store: HiddenStore
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float32 logits [rows, vocab], next-token targets [rows]) for every position but each sequence's
        last, a block of rows at a time: the same blocks for two models of the same vocabulary."""
        rows = max(1, _LOGIT_BLOCK_BYTES // (self.vocab_size * 4))
        with self._output_loaded() as head:
            for b, ids in enumerate(batches):
                normed = self.final_norm(store[b])[:, :-1]
                hidden = normed.reshape(-1, normed.shape[-1])
                targets = ids[:, 1:].reshape(-1).to(self.device)
                for start in range(0, hidden.shape[0], rows):
                    yield self._finish_logits(head(hidden[start:start + rows])), targets[start:start + rows]

    @torch.no_grad()
    def logits_at(self, batches: list[torch.Tensor], store: HiddenStore, positions: list[torch.Tensor]
                  ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Float32 logits at `positions[b]` (indices into batch b's rows, flattened [batch * seq]) only, in blocks:
        (b, index of the block's first position in positions[b], logits [positions, vocab])."""
        rows = max(1, _LOGIT_BLOCK_BYTES // (self.vocab_size * 4))
        with self._output_loaded() as head:
            for b in range(len(batches)):
                hidden = store[b]
                hidden = hidden.reshape(-1, hidden.shape[-1])
                wanted = positions[b].to(self.device)
                for start in range(0, wanted.shape[0], rows):
                    normed = self.final_norm(hidden[wanted[start:start + rows]])
                    yield b, start, self._finish_logits(head(normed))

    def _finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The lm_head's output as the causal LM's forward returns it, in float32: some families scale it
        (Granite divides by logits_scaling, Cohere multiplies by logit_scale) or cap it (final_logit_softcapping)."""
        logits = logits.float()
        if getattr(self.model, "logits_scaling", None):  # attributes the causal LM's own forward reads
            logits = logits / float(self.model.logits_scaling)
        if getattr(self.model, "logit_scale", None):
            logits = logits * float(self.model.logit_scale)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / float(cap)) * float(cap)
        return logits

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if moe_block_of(self.layers[i]) is not None]


class _ReachedMoE(Exception):
    """Stops a decoder layer's forward at its MoE block (StreamedModel.moe_inputs)."""


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, value: torch.Tensor):
    """A MoE block's output with its hidden states replaced (some blocks return (hidden, router_logits))."""
    return (value, *out[1:]) if isinstance(out, tuple) else value


# The decoder stack's norm after its last layer, by name (DBRX: norm_f)
_FINAL_NORMS = ("norm", "embedding_norm", "final_layernorm", "norm_f")
_ROUTER_WEIGHTS = ("gate.weight", "router.weight", "gate.wg.weight", "router.layer.weight", "router.gate.weight",
                   "router.classifier.weight", "router.proj.weight")
# The children of a decoder layer whose router and experts sit on it (Gemma 4) that its MoE computation reads.
_LAYER_MOE_PARTS = ("router", "experts", "pre_feedforward_layernorm_2")


def moe_block_of(layer: torch.nn.Module) -> torch.nn.Module | None:
    """A decoder layer's routed MoE block (experts beside a router), or None for a dense layer: the module whose
    input is the experts' input (what the dump stores) and whose output holds their routed sum.

    Found by structure: in memory transformers 5 renames some blocks (Mixtral's block_sparse_moe
    becomes mlp) and fuses the experts. Where the router and experts sit on the decoder layer itself (Gemma 4),
    the block is the experts module: called as experts(x, top_k_index, top_k_weights), so run it through
    moe_block_output."""
    for name in ("mlp", "block_sparse_moe", "feed_forward", "ffn"):
        block = getattr(layer, name, None)
        if hasattr(block, "experts") and router_weight(block) is not None:
            return block
    if isinstance(getattr(layer, "experts", None), torch.nn.Module) and router_weight(layer) is not None:
        return layer.experts
    return None


def moe_router_weight(layer: torch.nn.Module) -> torch.Tensor | None:
    """The router's weight [N, d] of a decoder layer's MoE block, wherever it sits (None for a dense layer)."""
    block = moe_block_of(layer)
    if block is None:
        return None
    return router_weight(block) if block is not getattr(layer, "experts", None) else router_weight(layer)


def moe_block_output(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What decoder layer `layer`'s MoE block outputs on its input x [..., d] (the experts' input, as dumped), as
    the layer calls it. Gemma 4's router reads rmsnorm(residual), which is x / pre_feedforward_layernorm_2's weight
    (its own norm then divides by rms(x / w) = 1 up to the norm's eps: a relative 1e-6 at most on the logits)."""
    block = moe_block_of(layer)
    if block is not getattr(layer, "experts", None):
        return _first(block(x))
    flat = x.reshape(-1, x.shape[-1])
    weight = layer.pre_feedforward_layernorm_2.weight
    _, top_k_weights, top_k_index = layer.router((flat.float() / weight.float()).to(flat.dtype))
    return block(flat, top_k_index, top_k_weights).reshape(x.shape)


def _nearest_lm_head(model: torch.nn.Module, prefix: str) -> torch.nn.Module:
    """The `lm_head` nearest above the decoder stack `prefix` (Qwen3-Omni-MoE: thinker.model.language_model ->
    thinker.lm_head)."""
    parts = prefix.split(".")
    for n in range(len(parts) - 1, -1, -1):
        name = ".".join([*parts[:n], "lm_head"])
        if _has_submodule(model, name):
            return model.get_submodule(name)
    raise DernError(f"the {type(model).__name__} built from config.json has no lm_head")


def _has_submodule(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def router_weight(block: torch.nn.Module) -> torch.Tensor | None:
    """The router's weight [N, d] of an MoE block, whatever the family calls the router."""
    params = dict(block.named_parameters())
    return next((params[n] for n in _ROUTER_WEIGHTS if n in params), None)


def _stored_dtype(ckpt: Checkpoint, family: Family) -> torch.dtype:
    """The dtype the weights are stored in (the embedding's), which the forward runs in by default."""
    name = family.embed_name()
    entry = ckpt.entries.get(name)
    if entry is None:
        raise DernError(f"checkpoint has no {name}; cannot run its forward")
    if entry.dtype not in FLOAT_DTYPES:
        raise DernError(f"embeddings stored as {entry.dtype}; the streamed forward runs float checkpoints only")
    return DTYPES[entry.dtype]


def parse_dtype(name: str) -> torch.dtype | None:
    """None for "auto" (the stored dtype), else one of float32, bfloat16, float16."""
    if check_dtype_name(name) == "auto":
        return None
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def batched(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)] if ids.numel() else []
