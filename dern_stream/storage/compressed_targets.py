"""Which modules a compressed-tensors quantization_config quantizes, and its `ignore` and `targets` entries carried
over to an output whose routed experts were renumbered or dropped (docs/formats.md, "compressed-tensors
checkpoints"). The matching is the library's (`compressed_tensors.utils.match.is_match`: an exact name, a `re:` regex
matched from the start, or the name of a class of the module), written out here for a Linear module, as each
routed-expert projection is in the model llm-compressor quantized: importing the library imports transformers,
seconds that every command opening such a checkpoint would wait before its first check (docs/formats.md says why;
tests/storage/test_compressed_targets.py holds it to the library's answers)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# The classes in torch.nn.Linear's MRO that are modules, which the library's class-name targets are compared with.
LINEAR_CLASSES = ("Linear", "Module")


def matches(module: str, entry: str) -> bool:
    """Whether target or ignore `entry` names Linear module `module` (is_match for one entry)."""
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return entry == module or entry in LINEAR_CLASSES


def matched(entries: Iterable[str], modules: Sequence[str], index: set[str] | None = None) -> set[str]:
    """The modules among `modules` (Linear modules, by name) that any of `entries` matches, as compressed-tensors
    matches them. `index`: set(modules), where the caller has it."""
    index = set(modules) if index is None else index
    out: set[str] = set()
    for entry in entries:
        if entry.startswith("re:"):
            pattern = re.compile(entry[3:])
            out.update(m for m in modules if pattern.match(m))
        elif entry in LINEAR_CLASSES:
            out.update(modules)
        elif entry in index:  # an exact name: looked up (an ignore list names thousands, a large model has 10^5)
            out.add(entry)
    return out


def quantized(targets: Iterable[str], ignore: Iterable[str], modules: Sequence[str]) -> set[str]:
    """The modules among `modules` that a config group with `targets` quantizes, given the config's `ignore` list:
    matched by a target and by no ignore entry (compressed_tensors.utils.match.match_named_modules)."""
    index = set(modules)
    return matched(targets, modules, index) - matched(ignore, modules, index)


def carried_entries(entries: list[str], sources: dict[str, str], dropped: Iterable[str],
                    others: Sequence[str]) -> list[str]:
    """`entries` (an ignore list, or a group's targets) for the output. `sources`: each routed-expert module of the
    output -> the input module it was made from; `dropped`: the input's routed-expert modules the output does not
    have; `others`: every other module holding tensors, named alike in both. An entry that matches exactly the output
    modules whose sources it matched is kept as it is (a regex by role or by layer, a class name, a module that is
    not a routed expert); any other (an exact expert name, a regex naming expert numbers) is replaced by the exact
    names of the output modules it stands for, in its place: none, where it named only dropped experts."""
    outputs, inputs = list(sources), [*sources.values(), *dropped]
    output_index, input_index, other_index = set(outputs), set(inputs), set(others)
    carried: list[str] = []
    for entry in entries:
        was = matched([entry], inputs, input_index)
        wanted = {m for m, source in sources.items() if source in was}
        stale = entry in input_index and wanted != {entry}  # (an expert's exact name, now another's or none's)
        if not stale and matched([entry], outputs, output_index) == wanted:
            carried.append(entry)
            continue
        hits = matched([entry], others, other_index)
        carried += [m for m in outputs if m in wanted] + [m for m in others if m in hits]
    return list(dict.fromkeys(carried))  # (without repeats, in order)
