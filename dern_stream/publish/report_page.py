"""The report's HTML page: one file beside its PNG plots (no scripts, nothing fetched from elsewhere)."""

from __future__ import annotations

from html import escape

CAPTIONS = {
    "importance": "Expert importance per layer (the share of the layer's routing each expert receives on the "
                  "calibration inputs), with the kept experts ringed.",
    "reassigned": "Segments (neurons) each layer moved from dropped experts into kept ones.",
    "pairs": "Segments moved from each dropped expert (rows) to each kept expert (columns).",
    "similarity": "Each pooled segment's best cosine similarity to a kept expert. Only segments right of alpha "
                  "(dashed; every candidate when alpha is chosen per layer, see the table for each layer's choice) "
                  "move; the rest are dropped.",
    "clusters": "Members per k-means cluster in the rebuilt experts: each cluster becomes one neuron.",
    "error": "Relative error of each layer's MoE output against the original layer's, for the setting kept, on "
             "the cached inputs the options were fitted on (the fit sample: an in-sample measure; with --holdout, "
             "on the held-out rows the choice was made on), and after the refits where there are any (the "
             "least-squares refit, then the gradient steps). `dern-stream eval --reference` measures it on other "
             "inputs.",
}
TITLES = {"importance": "Importance and kept experts", "reassigned": "Segments reassigned",
          "pairs": "Reassignment by expert pair", "similarity": "Similarity against alpha",
          "clusters": "k-means cluster sizes", "error": "Output error"}
STYLE = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
         "text-align:left;font-size:90%}figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555}"
         ".missing{color:#777;font-style:italic}")


def render_page(data: dict) -> str:
    """index.html for report_data's numbers, its `images` and `not_drawn`."""
    title = f"dern-stream report: {data['source'] or 'checkpoint'}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>", _summary(data)]
    for name, heading in TITLES.items():
        parts.append(f"<h2>{escape(heading)}</h2>")
        if name in data["images"]:
            parts.append(f"<figure><img src='{escape(data['images'][name])}' alt='{escape(heading)}'>"
                         f"<figcaption>{escape(CAPTIONS[name])}</figcaption></figure>")
        else:
            parts.append(f"<p class='missing'>Not drawn: {escape(data['not_drawn'].get(name, ''))}.</p>")
    parts += ["<h2>Layers</h2>", _layer_table(data), *_task_tables(data), "</body></html>"]
    return "\n".join(parts) + "\n"


def _summary(data: dict) -> str:
    rows = [
        ("model type", data["model_type"]),
        ("experts per MoE layer", f"{data['experts_before']} → {data['experts_after']}"),
        ("neurons per expert", f"{data['intermediate_before']} → {data['intermediate_after']}"),
        ("method", data["method"] + (f" (recipe {data['recipe']})" if data["recipe"] else "")),
        ("segments reassigned", sum(entry["segments_reassigned"] for entry in data["layers"])),
        ("experts rebuilt", sum(len(entry["rebuilt_experts"]) for entry in data["layers"])),
        ("dern-stream", data["dern_stream_version"]),
    ]
    rows += [(f"option {key}", value) for key, value in data["options"].items() if value is not None]
    return _table(["", ""], rows, header=False)


def _layer_table(data: dict) -> str:
    rows = []
    for entry in data["layers"]:
        before, after = entry["error_before_refit"], entry["error_after_refit"]
        rows.append((entry["layer"], " ".join(map(str, entry["kept"])), entry["segments_reassigned"],
                     " ".join(map(str, entry["rebuilt_experts"])) or "-",
                     (entry["chosen"] or "-") + (f" +{entry['gradient_steps']} steps" if entry.get("gradient_steps")
                                                 else ""),
                     f"{before:.4f}" if before is not None else "-", f"{after:.4f}" if after is not None else "-"))
    return _table(["layer", "kept experts", "segments moved", "rebuilt experts", "chosen setting", "output error",
                   "after the refits"], rows)


def _task_tables(data: dict) -> list[str]:
    """The lm-eval task scores given to `card --eval`, a table per report."""
    parts = []
    for e in data.get("task_scores") or []:
        against = e.get("reference_model")
        parts.append(f"<h2>Task scores of {escape(str(e['model']))}" + (f" against {escape(str(against))}</h2>"
                                                                        if against else "</h2>"))

        def num(v, spec=".4f"):
            return "-" if v is None else format(v, spec)

        if against:
            rows = [(r["task"], r["metric"], num(r["value"]), num(r["reference"]), num(r["difference"], "+.4f"),
                     num(r["difference_stderr"]), num(r["items"], "d")) for r in e["scores"]]
            parts.append(_table(["task", "metric", "score", "reference", "difference", "± paired SE", "items"], rows))
        else:
            rows = [(r["task"], r["metric"], num(r["value"]), num(r["stderr"])) for r in e["scores"]]
            parts.append(_table(["task", "metric", "score", "± stderr"], rows))
    return parts


def _table(headings: list[str], rows: list[tuple], header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headings) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"
