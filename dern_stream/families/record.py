"""What a model family looks like on disk, as one plain record: tensor names, config keys and their value rules,
routing, output config rules, and the tiny model the tests build of it. Records hold data and named functions only
(no lambdas), so a plan pickles whole for worker processes and Ray tasks. Every record: catalog/."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import DernError, arg
from ..storage.formats import MXFP4_BLOCKS, MXFP4_SCALES
from .config_rules import Rule
from .routing import SigmoidGroupLimited, SoftmaxGroupLimited, SoftmaxTopK

if TYPE_CHECKING:
    import torch

Router = SoftmaxTopK | SoftmaxGroupLimited | SigmoidGroupLimited
PARTS = ("gate", "up", "down")


@dataclass(frozen=True)
class GroupPlan:
    """How the kept experts relate to routing groups (DeepSeek-style group-limited routing).

    balanced: keep K / n_group experts in every group, so the output keeps the input's routing
    structure. Otherwise groups collapse (n_group = topk_group = 1) and the K best are kept globally.
    """

    n_group: int
    topk_group: int
    balanced: bool


@dataclass(frozen=True)
class FusedExperts:
    """All routed experts of a layer in two tensors (four with gpt-oss's biases, three with DBRX's gate and up apart),
    expert e a contiguous slice of the leading dimension (names are templates under the layer, as Family's). The 2h
    axis holds gate and up: gate | up, or alternating (`interleaved`, gpt-oss); the gate/up bias [N, 2h] is laid out
    the same. With `up` named, gate_up holds the gate alone and `up` the up projection, each [N, h, d] (or [N, d, h]
    with gate_up_cols)."""

    module: str  # every tensor under it is the router's or the experts' (anything else is refused)
    gate_up: str
    down: str
    gate_up_cols: bool  # [N, d, 2h] (Llama-4, gpt-oss) rather than [N, 2h, d] (Granite)
    down_cols: bool  # [N, h, d] (Llama-4, gpt-oss) rather than [N, d, h] (Granite)
    interleaved: bool = False
    gate_up_bias: str | None = None  # [N, 2h], with down_bias [N, d] (gpt-oss)
    down_bias: str | None = None
    # A per-expert output scale [N] (Gemma 4's router.per_expert_scale, which multiplies expert e's combine weight):
    # split() folds it into the expert's down projection, so the methods see s_e E_e, the expert as the model
    # applies it; join() writes a rebuilt expert (whose down projection then holds its scale) with scale 1, and a
    # kept expert nothing changed keeps its own entry with its other bytes.
    scale: str | None = None
    # transformers loads either orientation of gate_up and down (Qwen3-VL-MoE: the Hub's [N, d, 2h] and [N, h, d], or
    # the [N, 2h, d] and [N, d, h] it saves itself), each taken as stored where its shape is the in-memory one, which
    # gate_up_cols and down_cols then describe: Family.stored_layout says which a checkpoint holds.
    transposable: bool = False
    up: str | None = None  # the up projection's own tensor (DBRX's v1, beside w1 the gate and w2 the down)
    # Each tensor stored with its expert dimension flattened into the next, [N * rows, cols] (DBRX's [N * h, d]): the
    # same bytes as [N, rows, cols], which is how this tool reads and writes it (layout/fused_tensors.py).
    flat: bool = False

    @property
    def biased(self) -> bool:
        return self.gate_up_bias is not None

    def templates(self) -> list[str]:
        return [self.gate_up, *([self.up] if self.up else []), self.down,
                *([self.gate_up_bias, self.down_bias] if self.biased else []), *([self.scale] if self.scale else [])]

    def shapes(self, hidden: int, intermediate: int) -> list[tuple[int, ...]]:
        """One expert's slice of each tensor, in templates() order."""
        rows = intermediate if self.up else 2 * intermediate
        gate_up = (hidden, rows) if self.gate_up_cols else (rows, hidden)
        down = (intermediate, hidden) if self.down_cols else (hidden, intermediate)
        return [gate_up, *([gate_up] if self.up else []), down,
                *([(2 * intermediate,), (hidden,)] if self.biased else []), *([()] if self.scale else [])]

    def _pair(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = rows.shape[0] // 2
        return (rows[0::2], rows[1::2]) if self.interleaved else (rows[:h], rows[h:])

    def _unpair(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.stack((gate, up), dim=1).flatten(0, 1) if self.interleaved else torch.cat((gate, up))

    def split(self, slices: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """One expert's slices -> (gate [h, d], up [h, d], down [d, h], bias [h, 2] or None, down bias [d] or
        None), views where the layout allows (the down projection times the expert's scale, where there is one)."""
        import torch

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.T if self.gate_up_cols else t

        gate, up = (rows(slices[0]), rows(slices[1])) if self.up else self._pair(rows(slices[0]))
        down = slices[2 if self.up else 1]
        down = down.T if self.down_cols else down
        if self.scale:
            down = down * slices[-1]
        if not self.biased:
            return gate, up, down, None, None
        return gate, up, down, torch.stack(self._pair(slices[2]), dim=-1), slices[3]

    def join(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None,
             down_bias: torch.Tensor | None = None) -> list[torch.Tensor]:
        """split's inverse: the slices, contiguous (the biases and the scale only where the layout has them)."""
        import torch

        def laid(t: torch.Tensor) -> torch.Tensor:
            return (t.T if self.gate_up_cols else t).contiguous()

        out = [laid(gate), laid(up)] if self.up else [laid(self._unpair(gate, up))]
        out.append((down.T if self.down_cols else down).contiguous())
        if self.biased:
            out += [self._unpair(bias[:, 0], bias[:, 1]).contiguous(), down_bias.contiguous()]
        if self.scale:  # (the down projection holds the scale: split's)
            out.append(torch.ones((), dtype=down.dtype))
        return out


@dataclass(frozen=True)
class RouterInput:
    """Where the router reads its own normalisation of the layer's input rather than the experts' (Gemma 4): the
    router's logits are proj(rmsnorm(x) * scale * d^-0.5) while the experts read rmsnorm(x) * w, the weight of the
    RMSNorm named `norm`. The calibration dump holds the experts' input y = rmsnorm(x) * w, so the router's logits
    are (y * c) @ proj^T with c = scale / w * d^-0.5 [d], exactly where w has no zero entry (Gating.input_scale).
    Names are templates under the layer, as Family's; both are [d] and copied unchanged."""

    scale: str  # the router's own [d] scale
    norm: str  # the weight [d] of the norm whose output the experts read

    def names(self, layer_prefix: str) -> tuple[str, str]:
        """The two tensors' names under the decoder layer `layer_prefix` ("model.layers.3.")."""
        return f"{layer_prefix}{self.scale}", f"{layer_prefix}{self.norm}"

    def vector(self, scale: torch.Tensor, norm: torch.Tensor, layer_prefix: str) -> torch.Tensor:
        """c [d], float32, from the layer's stored scale and norm weight; refused where the norm has a zero entry
        (the experts' input then loses what the router reads)."""
        if not bool((norm != 0).all()):
            raise DernError(f"{layer_prefix}{self.norm} has a zero entry, so the router's input cannot be "
                            "recovered from the experts' (the calibration dump's): not supported")
        return scale.float() / norm.float() * scale.shape[-1] ** -0.5


def always(config: dict) -> bool:
    return True


def never(config: dict) -> bool:
    return False


def norm_topk_prob(config: dict, default: bool = False) -> bool:
    """Whether the scores are renormalised over A(x): config.json's norm_topk_prob, else the config class's default."""
    return bool(config.get("norm_topk_prob", default))


def unit_scale(config: dict) -> float:
    return 1.0


@dataclass(frozen=True, eq=False)
class Family:
    """One MoE family as data (catalog/ holds every record; docs/architecture.md says how to add one).

    Tensor names are templates under the decoder layer `{layers}.{i}.` (`model.layers.{i}.`): `router` and `bias`
    as they are, `experts` with `{e}` (the expert) and `{proj}` (one of `proj_names`, in PARTS order)."""

    model_type: str
    expert_count_keys: tuple[str, ...]  # any that config.json holds is rewritten; the first found is read
    intermediate_key: str
    make_router: Callable[[dict], Router]
    # The decoder layers' name on disk and in the model transformers builds from config.json (a composite model's
    # language model: Qwen3-VL-MoE's model.language_model.layers; checkpoint/config_view.py reads its config).
    layers: str = "model.layers"
    # The decoder layers' name in that model where transformers renames them from the checkpoint's (Qwen3-Omni-MoE's
    # thinker: model.language_model.layers, stored as model.layers; model_memory_names then maps the rest)
    memory_layers: str | None = None
    multimodal: bool = False  # the checkpoint is a multimodal model's, whose language model this is (text_config)
    embed: str = "embed_tokens"  # the input embedding beside the decoder layers (DBRX: wte)
    router: str = "mlp.gate.weight"
    experts: str = "mlp.experts.{e}.{proj}.weight"
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    bias: str | None = None  # score-correction bias [N] (or [1, N]) added to the scores for the choice only
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    # In-memory names (under the layer) that transformers 5 loads from other on-disk names: (memory, disk)
    # prefixes, for the streamed forward of dump and eval. Fused in-memory experts need no entry.
    memory_names: tuple[tuple[str, str], ...] = ()
    # The same for names outside the decoder layers (Sarvam-MoE: model.embed_tokens. is model.word_embeddings. on disk)
    model_memory_names: tuple[tuple[str, str], ...] = ()
    # In-memory tensors (under the layer) that transformers splits along dim 0 from one on-disk tensor: (on-disk prefix,
    # in-memory prefixes in order), each taking as many rows as the model built from config.json gives it (Sarvam-MoE's
    # attention.query_key_value. into self_attn.q_proj., k_proj., v_proj.).
    memory_splits: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # In-memory tensors (under the layer) that transformers concatenates along dim 0 from several on-disk ones:
    # (memory name, on-disk names in order). Kimi-Linear's KDA convolution.
    memory_concatenations: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Shared experts whose width is <this key> x the routed experts' width (DeepSeek): kept as they are by
    # rescaling the key when --intermediate-size changes the routed width.
    shared_count_key: str | None = None
    # Why --intermediate-size cannot change the experts' width, when another module reads the same key.
    fixed_width: str | None = None
    grouped_routing: Callable[[dict], bool] = never  # more than one routing group in use
    uses_groups: Callable[[dict], bool] = never  # the router reads n_group / topk_group
    group_defaults: tuple[int, int] | None = None  # n_group, topk_group when config.json leaves them out
    # How the model combines the selected experts' outputs (only the output-error options need it):
    # scores renormalised over A(x)? then times what? (docs/method.md, "Notation")
    renormalises: Callable[[dict], bool] = norm_topk_prob
    routed_scale: Callable[[dict], float] = unit_scale
    # Experts every routing group must hold (n_group groups, or one): DeepSeek-V3 scores a group by the
    # sum of its top two experts, so a group of one cannot be routed (transformers: "selected index k
    # out of range").
    min_group_experts: int = 1
    # config.json's decoder-layer count (LongCat-Flash: num_layers, each layer holding two attention sublayers).
    layers_key: str = "num_hidden_layers"
    hidden_layers_per_layer: int = 1  # where layers_key is another: num_hidden_layers is this x its value, if given
    # The config key counting zero-computation (identity) experts whose router rows and correction-bias entries follow
    # the routed experts' (LongCat-Flash): not weights, so every rewrite keeps them, after the K kept experts' rows.
    passive_key: str | None = None
    passive_default: int = 0  # the config class's count where config.json leaves passive_key out
    # The fewest experts the family's config can build a MoE layer of, and why (Jamba: 2), where that is above one.
    min_experts: tuple[int, str] | None = None
    # Experts every token is routed to whatever num_experts_per_tok says (PhiMoE's sparsemixer: 2).
    fixed_top_k: int | None = None
    # Which decoder layers config.json makes MoE layers (as the family's modeling code decides), or None
    # where every one is: checked against the layers whose router the shards hold.
    moe_layer: Callable[[dict, int], bool] | None = None
    remote_code: bool = False  # no transformers class: rewrite and verify only
    # The causal-LM classes config.json's `architectures` (or `auto_map`) names for this family: a checkpoint of
    # another model_type that names one (Kimi-K2's kimi_k2 names DeepseekV3ForCausalLM) is handled as this family.
    architectures: tuple[str, ...] = ()
    # The checkpoint may hold a multi-token-prediction block under `mtp.` (Qwen3-Next, Qwen3.5, ERNIE), which
    # transformers does not load: not carried over, since its experts would disagree with K.
    drops_mtp: bool = False
    fused: FusedExperts | None = None  # the experts' layout on disk when not one tensor per expert and part
    bias_in_logits: bool = False  # `bias` is part of the router's logits (gpt-oss), not a correction for the choice
    make_glu: Callable[[dict], Callable] | None = None  # experts' glu(g, u) when not act(g) * u (gpt-oss)
    scales_expert_input: bool = False  # the router's score scales the expert's input, not its output (Llama-4)
    router_input: RouterInput | None = None  # the router reads its own normalisation of the input (Gemma 4)
    # The family's own config.json keys and the values they take (config_rules.py), checked before any work beside
    # the keys every family shares; the expert count, top-k and width keys are checked from the fields above.
    config_rules: Mapping[str, Rule] = field(default_factory=dict)
    # Sub-configs of config.json the family reads as top-level keys, and keys it names its own way as (the name every
    # family reads, config.json's key) pairs: DBRX's ffn_config, and its d_model as hidden_size (config_view.py).
    config_sections: tuple[str, ...] = ()
    config_aliases: tuple[tuple[str, str], ...] = ()
    # The tiny random model the tests and the demo build of this family (tiny_models.py): its config class's values
    # beside the shared small sizes, and keys written into its config.json that the config class does not keep.
    # A remote-code family's is its whole config.json.
    tiny_config: Mapping[str, object] = field(default_factory=dict)
    tiny_config_extra: Mapping[str, object] = field(default_factory=dict)

    # One record per model_type: two records are the same family when their model_type is (a record that a worker
    # unpickled holds equal, not identical, partial functions).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Family) and other.model_type == self.model_type

    def __hash__(self) -> int:
        return hash(self.model_type)

    # --- tensor names -------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        return f"{self.layers}.{layer}."

    def layer_of(self, name: str) -> int | None:
        """The decoder layer index of a tensor under `{layers}.N.`, else None."""
        return _index_under(self.layers, name)

    def embed_name(self) -> str:
        """The input embedding's on-disk name (beside the decoder layers; model_memory_names applied)."""
        return self.disk_name(f"{self.layers.rsplit('.', 1)[0]}.{self.embed}.weight", None)

    def router_name(self, layer: int) -> str:
        return self.layer_prefix(layer) + self.router

    def bias_name(self, layer: int) -> str | None:
        return self.layer_prefix(layer) + self.bias if self.bias else None

    def expert_name(self, layer: int, expert: int, part: str) -> str:
        proj = self.proj_names[PARTS.index(part)]
        return self.layer_prefix(layer) + self.experts.format(e=expert, proj=proj)

    def expert_names(self, layer: int, experts: int) -> list[str]:
        """Every routed-expert tensor of experts 0..experts-1 in `layer`: expert by expert, parts in PARTS order."""
        return [self.expert_name(layer, e, part) for e in range(experts) for part in PARTS]

    def moe_layers(self, names: Iterable[str]) -> list[int]:
        """Layers holding routed experts, found by their router tensor (dense and MTP layers included)."""
        pattern = re.compile(rf"^{re.escape(self.layers)}\.(\d+)\.{re.escape(self.router)}$")
        return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)

    def stored_layout(self, entries: Mapping, hidden: int, intermediate: int) -> Family:
        """This record with its fused experts' orientation as `entries` (a checkpoint's tensor headers) store them,
        where transformers loads either (FusedExperts.transposable), checked to be one for every layer; else self."""
        if self.fused is None or not self.fused.transposable:
            return self
        found = set()
        for layer in self.moe_layers(entries):
            names, shapes = self.fused_names(layer)[:2], self.fused.shapes(hidden, intermediate)[:2]
            if not all(n in entries for n in names):
                return self  # (the layer checks name what is missing)
            found.add(tuple(tuple(entries[n].shape[1:]) != s for n, s in zip(names, shapes, strict=True)))
        if len(found) > 1:
            raise DernError(f"the {self.model_type} layers store their experts in different orientations "
                            "(some transposed): not supported")
        if not found or found == {(False, False)}:
            return dataclasses.replace(self, fused=dataclasses.replace(self.fused, transposable=False))
        flip_gate_up, flip_down = found.pop()
        fused = dataclasses.replace(self.fused, transposable=False, gate_up_cols=self.fused.gate_up_cols ^ flip_gate_up,
                                    down_cols=self.fused.down_cols ^ flip_down)
        return dataclasses.replace(self, fused=fused)

    def is_dropped(self, name: str) -> bool:
        """A tensor the output leaves out (a multi-token-prediction block transformers does not load)."""
        return self.drops_mtp and name.startswith("mtp.")

    def fused_names(self, layer: int) -> list[str]:
        """A fused family's expert tensors of `layer`: gate_up, down (and their biases)."""
        return [self.layer_prefix(layer) + t for t in self.fused.templates()]

    def is_layer_expert_tensor(self, layer: int, name: str) -> bool:
        if self.fused is not None:  # (MXFP4 stores a weight as its _blocks and _scales)
            return any(name in (f, f + MXFP4_BLOCKS, f + MXFP4_SCALES) for f in self.fused_names(layer))
        return name.startswith(self.layer_prefix(layer) + self.experts.split("{e}")[0])

    def disk_name(self, memory_name: str, layer: int | None) -> str:
        """The on-disk name of an in-memory tensor of decoder layer `layer` (memory_layers and memory_names applied),
        or of one outside the layers (layer None: model_memory_names applied)."""
        if layer is None:
            for memory, disk in self.model_memory_names:
                if memory_name.startswith(memory):
                    return disk + memory_name[len(memory):]
            return memory_name
        prefix = f"{self.layers_in_memory}.{layer}."
        if not memory_name.startswith(prefix):
            return memory_name
        rest = memory_name[len(prefix):]
        for memory, disk in self.memory_names:
            if rest.startswith(memory):
                rest = disk + rest[len(memory):]
                break
        return self.layer_prefix(layer) + rest

    @property
    def layers_in_memory(self) -> str:
        """The decoder layers' name in the model transformers builds (memory_layers, else layers)."""
        return self.memory_layers or self.layers

    def memory_layer_of(self, name: str) -> int | None:
        """The decoder layer index of an in-memory tensor name (of the model transformers builds), else None."""
        return _index_under(self.layers_in_memory, name)

    # --- config -------------------------------------------------------------------------------
    def num_experts(self, config: dict) -> int:
        for key in self.expert_count_keys:
            if isinstance(config.get(key), int):
                return config[key]
        raise DernError(f"config.json has no expert count ({' or '.join(self.expert_count_keys)})")

    def decoder_layers(self, config: dict) -> int:
        """The decoder layers config.json declares (a positive integer: config_check.py)."""
        return config[self.layers_key]

    def passive_experts(self, config: dict) -> int:
        """Zero-computation experts the router scores after the routed ones (0 for most families)."""
        if self.passive_key is None:
            return 0
        value = config.get(self.passive_key, self.passive_default)
        return value if isinstance(value, int) else 0

    def top_k_key(self, config: dict) -> str:
        return next((k for k in self.top_k_keys if k in config), self.top_k_keys[0])

    def top_k(self, config: dict) -> int:
        """Experts each token is routed to."""
        if self.fixed_top_k is not None:
            return self.fixed_top_k
        k = config.get(self.top_k_key(config))
        if not isinstance(k, int) or k < 1:
            raise DernError(f"config.json has no valid {' or '.join(self.top_k_keys)}")
        return k

    def intermediate_size(self, config: dict) -> int:
        h = config.get(self.intermediate_key)
        if not isinstance(h, int) or h < 1:
            raise DernError(f"config.json has no valid {self.intermediate_key}")
        return h

    def group_plan(self, config: dict, experts: int, mode: str = "keep") -> GroupPlan | None:
        """None for ungrouped routing; else how K experts fit the groups (see GroupPlan). `mode` (--groups):
        "keep" the groups where they still route; "collapse" always; "auto" also where the groups a token may use
        would hold exactly top_k experts, so that the router no longer chooses among them."""
        if not self.grouped_routing(config):
            return None
        if mode == "collapse":
            return GroupPlan(1, 1, False)
        defaults = self.group_defaults or (None, None)
        n_group, topk_group = int(config["n_group"]), int(config.get("topk_group", defaults[1]))
        per_group, new_top_k = divmod(experts, n_group), min(self.top_k(config), experts)
        # Each group needs >= 2 experts (V3 scores a group by its top-2; vLLM requires it for all),
        # and the groups a token may use must hold at least top_k experts ("auto": more than top_k).
        reachable = topk_group * per_group[0]
        if per_group[1] == 0 and per_group[0] >= 2 and reachable >= new_top_k and (
                mode != "auto" or reachable > new_top_k):
            return GroupPlan(n_group, topk_group, True)
        return GroupPlan(1, 1, False)

    def routing_problem(self, config: dict) -> str | None:
        """Why a model with this config cannot route (in transformers or vLLM), or None when it can."""
        n, k, zero = self.num_experts(config), self.top_k(config), self.passive_experts(config)
        if k > n + zero:
            return f"num_experts_per_tok {k} exceeds the {n} experts" + (f" and {zero} zero experts" if zero else "")
        if self.min_experts is not None and n < self.min_experts[0]:
            return f"{self.min_experts[1]}, which this checkpoint's MoE layers are not"
        defaults = self.group_defaults or (None, None)
        n_group, topk_group = (config.get("n_group", defaults[0]), config.get("topk_group", defaults[1])) \
            if self.uses_groups(config) else (1, 1)
        if not all(type(v) is int and v >= 1 for v in (n_group, topk_group)):
            return f"group-limited routing needs positive integers n_group and topk_group, not {n_group}, {topk_group}"
        if n % n_group:
            return f"{n} experts do not split into n_group={n_group} equal groups"
        if self.fixed_top_k is not None and n < self.fixed_top_k:
            return f"{self.model_type} routes every token to {self.fixed_top_k} experts, and there are {n}"
        if n // n_group < self.min_group_experts:
            return (f"{self.model_type} scores each routing group by its top {self.min_group_experts} experts, "
                    f"and {n} experts in {n_group} group(s) leave {n // n_group} per group")
        if topk_group > n_group:
            return f"topk_group={topk_group} is not between 1 and n_group={n_group}"
        if topk_group * (n // n_group) + zero < k:
            return (f"the topk_group={topk_group} groups a token may use hold {topk_group * (n // n_group)} experts, "
                    f"fewer than num_experts_per_tok={k}")
        return None

    def check_expressible(self, config: dict, experts: int) -> None:
        """Refuse, before any work, a K whose output config could not route; name the K values that can.
        (The input config's own routing is checked with its other values: config_check.py.)"""
        problem = self.routing_problem(self.output_config(config, experts, None)[0])
        if problem is None:
            return
        n = self.num_experts(config)
        works = [k for k in range(1, n + 1) if self.routing_problem(self.output_config(config, k, None)[0]) is None]
        raise DernError(f"{arg('experts', experts)} gives a {self.model_type} model that cannot route ({problem}); "
                        f"K values that work for this model: {_ranges(works) or 'none'}")

    def output_config(self, config: dict, experts: int, intermediate_size: int | None,
                      groups: str = "keep") -> tuple[dict, list[str]]:
        """config.json for the output, and notes for the user about each non-obvious change."""
        out, notes = dict(config), []
        if config.get("model_type") != self.model_type:
            notes.append(f"model_type {config.get('model_type')} kept, with its auto_map: handled as "
                         f"{self.model_type}, whose class its config.json names")
        present = [k for k in self.expert_count_keys if k in config]
        for key in present or self.expert_count_keys[:1]:
            out[key] = experts
        routable = experts + self.passive_experts(config)
        for top_k_key in [k for k in self.top_k_keys if k in config]:
            top_k = config[top_k_key]
            if isinstance(top_k, int) and top_k > routable:
                out[top_k_key] = routable
                notes.append(f"{top_k_key} clipped from {top_k} to {routable} (K is below it)")
        if intermediate_size is not None:
            if self.fixed_width is not None and intermediate_size != self.intermediate_size(config):
                raise DernError(f"{arg('intermediate_size')} cannot change {self.model_type} experts: "
                                f"{self.fixed_width}")
            out[self.intermediate_key] = intermediate_size
            count_key = self.shared_count_key
            if count_key and config.get(count_key):
                shared = self.intermediate_size(config) * int(config[count_key])
                if shared % intermediate_size:
                    raise DernError(
                        f"{arg('intermediate_size', intermediate_size)} must divide the shared experts' width "
                        f"{shared}: {self.model_type} derives it as {count_key} * {self.intermediate_key}"
                    )
                out[count_key] = shared // intermediate_size
                notes.append(f"{count_key} set to {out[count_key]} so shared experts keep width {shared}")
        plan = self.group_plan(config, experts, groups)
        if plan is not None and not plan.balanced:
            out["n_group"], out["topk_group"] = 1, 1
            # (plain text: notes are logged and written to the audit and the card, never rendered as errors are)
            why = (f"--groups {groups}" if self.group_plan(config, experts).balanced else
                   f"n_group={config['n_group']} does not leave at least 2 kept experts per group at K={experts}")
            notes.append(f"group-limited routing collapsed to one group ({why})")
        return out, notes


def _index_under(layers: str, name: str) -> int | None:
    """N of a name `{layers}.N...`, else None."""
    if not name.startswith(layers + "."):
        return None
    index = name[len(layers) + 1:].split(".", 1)[0]
    return int(index) if index.isdigit() and index.isascii() else None


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def grouped_if(config: dict) -> bool:
    n_group = config.get("n_group")
    return isinstance(n_group, int) and n_group > 1
