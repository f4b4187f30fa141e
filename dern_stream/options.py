"""Rewrite options: one validated dataclass shared by the Python API and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .errors import DernError, arg
from .methods import all_methods, method_named, method_names
from .runtime.arguments import choice, number, parse_size, whole

SIM_COMPONENTS = ("gate", "up", "down")
IMPORTANCE_METHODS = ("routing", "router-norm")
METHODS = method_names()
KMEANS_INITS = ("gate-linf", "own")
SEQUENTIAL_TARGETS = ("layer", "model")
GROUP_CHOICES = ("keep", "auto", "collapse")
# Named bundles of method options; explicit options given beside a recipe override its values. DERN without a recipe
# runs "default": the paper's method with the down-projection refit, which carries nearly all of the recipe's gain at
# a small share of its cost (docs/method.md, "Recipes"); baselines without one run as their authors run them.
DEFAULT_RECIPE = "default"
RECIPES: dict[str, dict] = {
    DEFAULT_RECIPE: dict(kmeans_init="own", router_transfer=False, refit=True),
    "paper": {},  # the paper's DERN, as docs/method.md describes it (the field defaults below)
    "best": dict(kmeans_init="own", router_transfer=False, alpha_candidates=(1.0, 0.8, 0.6, 0.4, 0.2), refit=True,
                 refit_router=True, holdout=0.2, refit_steps=400, groups="auto", fit_tokens=131072),
}


def parse_components(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'up,down' -> ('up', 'down') in canonical gate/up/down order."""
    if not isinstance(value, (str, tuple, list)):
        raise DernError(f"{arg('sim_components')} must be a non-empty subset of gate,up,down; got {value!r}")
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p) for p in value]
    parts = [p for p in parts if p]
    unknown = sorted(set(parts) - set(SIM_COMPONENTS))
    if unknown or not parts:
        raise DernError(
            f"{arg('sim_components')} must be a non-empty subset of gate,up,down; got {','.join(parts) or 'nothing'}"
        )
    return tuple(c for c in SIM_COMPONENTS if c in parts)


def parse_floats(value: str | tuple | list, name: str) -> tuple[float, ...]:
    """'1,0.6,0.4' -> (1.0, 0.6, 0.4); each must lie in [0, 1]."""
    try:
        parts = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
        out = tuple(float(p) for p in parts if not isinstance(p, bool))
    except (ValueError, TypeError):
        raise DernError(f"{arg(name)} must be comma-separated numbers in [0, 1], got {value!r}") from None
    if not out or len(out) != len(parts) or any(not 0.0 <= a <= 1.0 for a in out):
        raise DernError(f"{arg(name)} must be comma-separated numbers in [0, 1], got {value!r}")
    return out


OUTPUT_DTYPES = ("bf16",)


def as_flags(bundle: dict) -> str:
    """A recipe as the command-line options it stands for."""
    flags = []
    for key, value in bundle.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags.append(f"--{name} {','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return " ".join(flags)


def option(default, help: str, choices: tuple[str, ...] | None = None, flag: bool = False, shown=None,
           cli_type: type | None = None):
    """A RewriteOptions field and its command-line option, described once: the CLI builds `--name` from
    it (cli.rewrite_options), with `help`, `choices`, a --name/--no-name pair for a `flag`, a value of
    `cli_type` (else the field's own type), and `[default: shown]` (the default unless `shown` is given)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "cli_type": cli_type,
                                            "shown": default if shown is None else shown})


@dataclass(frozen=True)
class RewriteOptions:
    """Everything that changes the output of a rewrite (recorded in dern_stream.json), each option
    described once for the Python API and the command line."""

    experts: int
    method: str = option(METHODS[0], f"{METHODS[0]}, or a baseline: {', '.join(METHODS[1:])} "
                                      '(docs/method.md, "Methods").', METHODS)
    recipe: str | None = option(None, f"A bundle of method options. '{DEFAULT_RECIPE}', what DERN runs without one, "
                                      f"is {as_flags(RECIPES[DEFAULT_RECIPE])} (the refit is left out, with a note, "
                                      "where it cannot run: without a dump, or on experts with biases); 'paper' is "
                                      "the paper's DERN; 'best', the most accurate and many times slower, is "
                                      f"{as_flags(RECIPES['best'])}. Options given beside it override its values.",
                                      tuple(RECIPES), shown=f"{DEFAULT_RECIPE} (baselines: none)")
    alpha: float = option(0.4, "Similarity threshold for moving a dropped expert's segment (1 = pure pruning, "
                               "0 = move all).")
    sim_components: tuple[str, ...] = option(("up", "down"), "Segment parts compared by cosine: any of "
                                                             "gate,up,down.", shown="up,down")
    kmeans_iters: int = option(20, "Maximum k-means iterations.")
    intermediate_size: int | None = option(None, "Shrink every expert to this many neurons (default: keep the "
                                                 "current size).")
    importance: str = option("routing", "Expert ranking: routing statistics from --calib, or router-norm (no data, "
                                        "weaker).", IMPORTANCE_METHODS)
    router_transfer: bool = option(True, "Apply the Eq. 8 router update.", flag=True, shown="on")
    kmeans_init: str = option("gate-linf", "k-means seeds: the paper's largest-gate-norm members, or the kept "
                                           "expert's own segments.", KMEANS_INITS)
    # Beyond the paper (docs/method.md, last section): choose alpha per layer by the output error it gives
    # on the cached inputs, and refit the kept experts' down projections by ridge least squares.
    alpha_candidates: tuple[float, ...] | None = option(
        None, "Choose alpha per layer among these (e.g. 1,0.8,0.6,0.4) by the output error on the cached inputs; "
              "include 1 and no layer is worse than pruning on them.")
    refit: bool = option(False, "Refit the kept experts' down projections by ridge least squares on the cached "
                                "inputs.", flag=True, shown="off")
    refit_ridge: float = option(1.0, "Ridge strength of --refit, relative to the mean Gram diagonal.")
    refit_router: bool = option(False, "Refit the kept experts' router rows on the cached inputs so that the "
                                       "compressed routing reproduces the original routing mass (a merged expert: "
                                       "its members' summed mass); with --refit, each layer also tries it without.",
                                flag=True, shown="off")
    refit_steps: int = option(0, "After the other refits, move the kept experts' gate, up and down projections "
                                 "by up to this many Adam steps on the output error (with --holdout, the number of "
                                 "steps is chosen on the held-out rows).")
    refit_group: int | None = option(None, "Experts --refit-steps moves at a time (default: all of a layer's kept "
                                           "experts), each group fitted in turn against the others' output: its "
                                           "Adam state is that of one group (less memory where experts are large).",
                                     shown="all")
    holdout: float = option(0.0, "Share of the cached inputs held out from fitting; the per-layer choice among "
                                 "alphas and refit variants is made on it (0: on the fitting inputs).")
    sequential: bool = option(False, "Fit each layer on the compressed model's own inputs: the rewrite runs the "
                                     "forward from the dump's token ids, the layers compressed so far in place "
                                     "(needs transformers).", flag=True, shown="off")
    sequential_target: str = option("layer", "With --sequential, what a layer is fitted to: 'layer', the original "
                                             "layer's output on the compressed model's inputs (GPTQ-style); 'model', "
                                             "its output on the original model's inputs (also works against the "
                                             "drift of the layers before).", SEQUENTIAL_TARGETS)
    groups: str = option("keep", "Group-limited routing (DeepSeek-V3): 'keep' keeps K / n_group experts in each "
                                 "group where the groups still route (else they collapse); 'collapse' keeps the K "
                                 "best overall and routes over all of them (n_group = topk_group = 1); 'auto' "
                                 "also collapses where the groups a token may use would hold just top_k experts "
                                 "(no routing choice left).", GROUP_CHOICES)
    fit_tokens: int = option(32768, "Cached inputs per layer used by the baselines, --alpha-candidates and --refit.")
    output_dtype: str | None = option(None, "Write a quantized (FP8, MXFP4) checkpoint dequantized, in this dtype, "
                                            "without quantization_config.", OUTPUT_DTYPES, shown="as stored")
    # Not recorded as a method choice: they change speed and layout, not values.
    device: str = option("auto", "auto (CUDA if present), cpu, cuda or cuda:N.")
    # Recorded in the run's identity, not as a method choice: torch's sums depend on how many threads split them.
    threads: int | None = option(None, "Torch threads each layer is computed with. The output's bytes can depend on "
                                 "it, so it is recorded, a resume keeps it, and runs with the same value write the "
                                 "same bytes whatever --workers says.", shown="the cores shared out among the workers")
    max_shard_size: int = option(5 * 10**9, "Largest output shard, e.g. 500MB, 2GB.", shown="5GB", cli_type=str)
    # The largest float32 block the reassignment and the k-means allocate (benchmarks/memory.py); not an option.
    similarity_block_bytes: int = field(default=16 * 2**20, repr=False)
    # Not options: which values the recipe set (not given by the caller), and what was left out of it on this model.
    from_recipe: tuple[str, ...] = field(default=(), repr=False)
    notes: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        """Every value checked, whatever its type (the Python API passes values unconverted)."""
        if type(self.experts) is not int or self.experts < 1:
            raise DernError(f"{arg('experts')} must be a positive integer, got {self.experts!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise DernError(f"{arg('alpha')} must lie in [0, 1], got {self.alpha!r}")  # (NaN fails the comparison too)
        whole("kmeans_iters", self.kmeans_iters)
        if self.threads is not None:
            whole("threads", self.threads)
        if self.intermediate_size is not None:
            whole("intermediate_size", self.intermediate_size)
        choice("method", self.method, METHODS)
        choice("kmeans_init", self.kmeans_init, KMEANS_INITS)
        choice("importance", self.importance, IMPORTANCE_METHODS)
        choice("sequential_target", self.sequential_target, SEQUENTIAL_TARGETS)
        choice("groups", self.groups, GROUP_CHOICES)
        number("refit_ridge", self.refit_ridge, 0.0)
        whole("fit_tokens", self.fit_tokens)
        whole("refit_steps", self.refit_steps, minimum=0)
        if self.refit_group is not None:
            whole("refit_group", self.refit_group)
        if self.output_dtype is not None:
            choice("output_dtype", self.output_dtype, OUTPUT_DTYPES)
        object.__setattr__(self, "holdout", number("holdout", self.holdout, 0.0, 0.5))
        for name, flag in (("router_transfer", self.router_transfer), ("refit", self.refit),
                           ("refit_router", self.refit_router), ("sequential", self.sequential)):
            if not isinstance(flag, bool):
                raise DernError(f"{arg(name)} must be true or false, got {flag!r}")
        if not isinstance(self.device, str):
            raise DernError(f"{arg('device')} must be a device name such as auto, cpu or cuda:0, got {self.device!r}")
        recombines = " or ".join(arg("method", m.name) for m in all_methods() if m.recombines_neurons)
        if self.alpha_candidates is not None:
            cands = parse_floats(self.alpha_candidates, "alpha_candidates")
            if not method_named(self.method).recombines_neurons:
                raise DernError(f"{arg('alpha_candidates')} applies to {recombines} only")
            object.__setattr__(self, "alpha_candidates", cands)
        if self.intermediate_size is not None and not method_named(self.method).recombines_neurons:
            raise DernError(f"{arg('intermediate_size')} needs {recombines} ({self.method} keeps whole experts)")
        if (self.sequential or self.holdout) and not self.uses_layer_outputs:
            name = "sequential" if self.sequential else "holdout"
            raise DernError(f"{arg(name, getattr(self, name))} changes nothing without an option fitted on the "
                            f"cached inputs: add {arg('refit', True)}, {arg('refit_router', True)} or "
                            f"{arg('alpha_candidates')}, or use a baseline")
        if self.refit_group is not None and not self.refit_steps:
            raise DernError(f"{arg('refit_group', self.refit_group)} changes nothing without {arg('refit_steps')}")
        object.__setattr__(self, "sim_components", parse_components(self.sim_components))
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))

    @classmethod
    def build(cls, experts: int, recipe: str | None = None, **given) -> RewriteOptions:
        """Options from a recipe (DERN without one: the default setting; a baseline without one: the field defaults),
        with the non-None `given` values on top; the default's refit left out without a dump."""
        if recipe is not None:
            choice("recipe", recipe, tuple(RECIPES))
        given = {k: v for k, v in given.items() if v is not None}
        if recipe is None and given.get("method", METHODS[0]) == METHODS[0]:
            recipe = DEFAULT_RECIPE
        bundle = {k: v for k, v in RECIPES.get(recipe, {}).items() if k not in given}
        options = cls(experts=experts, recipe=recipe, from_recipe=tuple(bundle), **{**bundle, **given})
        if options.importance == "router-norm":
            return options.without_default_refit("there is no calibration dump to fit it on")
        return options

    def without_default_refit(self, reason: str) -> RewriteOptions:
        """These options with the default setting's down refit left out, and a note saying why, where the default
        bundled it; else unchanged (a refit asked for is refused by the checks instead)."""
        if self.recipe != DEFAULT_RECIPE or "refit" not in self.from_recipe or not self.refit:
            return self
        note = (f"the default setting's down-projection refit is left out: {reason}; the rest of it runs (DERN, "
                "k-means started from each kept expert's own segments, no router transfer)")
        return replace(self, refit=False, notes=(*self.notes, note))

    @property
    def uses_layer_outputs(self) -> bool:
        """Whether the layer's outputs on the cached inputs are needed (baselines, choice, refit)."""
        return (method_named(self.method).keeps_from_outputs or bool(self.alpha_candidates) or self.refit
                or self.refit_router or bool(self.refit_steps))

    def fits_layers(self, num_experts: int, intermediate: int) -> bool:
        """Whether the layers are fitted on their cached outputs: where the options use them and a layer loses
        something. One that keeps every expert at its full width is the original layer, which no fit improves."""
        narrower = self.intermediate_size is not None and self.intermediate_size < intermediate
        return self.uses_layer_outputs and (self.experts < num_experts or narrower)

    def reads_expert_weights(self, num_experts: int, intermediate: int) -> bool:
        """Whether any expert weight must be read for computation: for the layer's outputs, a narrower width, or
        the method's own work. Else (pruning; DERN when no segment can move) kept experts are copied as raw bytes."""
        if self.fits_layers(num_experts, intermediate) or (self.intermediate_size is not None
                                                           and self.intermediate_size < intermediate):
            return True
        return method_named(self.method).reads_expert_weights(self, num_experts)

    def method_record(self) -> dict:
        """The options that determine the output tensors' values, for the audit record."""
        rec = asdict(self)
        for key in ("device", "threads", "max_shard_size", "similarity_block_bytes", "from_recipe", "notes"):
            rec.pop(key)
        rec["sim_components"] = list(self.sim_components)
        if self.alpha_candidates is not None:
            rec["alpha_candidates"] = list(self.alpha_candidates)
        return rec


def option_fields() -> list:
    """The RewriteOptions fields that are command-line options (all but `experts` and internal ones)."""
    return [f for f in fields(RewriteOptions) if "help" in f.metadata]
