"""What the rewrite's summary says of the setting it ran and of the error it left, from the options and the layers'
audit entries (dern_stream.json's `layers`)."""

from __future__ import annotations

from ..options import RewriteOptions, as_flags


def describe_setting(options: RewriteOptions) -> str:
    """'dern (recipe default)', 'prune', 'dern (recipe best, --alpha 0.6)'..."""
    given = {name: getattr(options, name) for name in _changed(options) if name not in options.from_recipe}
    parts = ([f"recipe {options.recipe}"] if options.recipe else []) + ([as_flags(given)] if given else [])
    return options.method + (f" ({', '.join(parts)})" if parts else "")


def _changed(options: RewriteOptions) -> list[str]:
    """The method options whose value is not the field's default, in the order of the fields."""
    blank = RewriteOptions(experts=options.experts)
    return [name for name, value in options.method_record().items()
            if name not in ("experts", "method", "recipe") and value != blank.method_record()[name]]


def mean_output_error(layers: dict) -> tuple[float, float | None] | None:
    """The mean relative output error of the layers that measured one, and the mean before their refits (None when
    no layer was refitted)."""
    measured = [entry["output_error"] for entry in layers.values() if entry.get("output_error")]
    if not measured:
        return None
    error = sum(m["error"] for m in measured) / len(measured)
    before = [_unfitted(m) for m in measured]
    if all(b is None for b in before):
        return error, None
    return error, sum(b if b is not None else m["error"] for b, m in zip(before, measured, strict=True)) / len(measured)


def _unfitted(measured: dict) -> float | None:
    """The chosen candidate's error before any refit, where it was refitted."""
    for candidate in measured.get("candidates", []):
        if candidate.get("candidate") == measured.get("chosen") and "error_after_refit" in candidate:
            return candidate["error"]
    return None
