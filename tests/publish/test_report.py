"""The report of a rewrite: its numbers against the rewrite's own record, and the page as a browser renders it."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from helpers import assert_clean_failure, cli_without

import dern_stream
from dern_stream.cli import main

pytest.importorskip("matplotlib")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ALPHA = 0.1  # low enough that the tiny random experts move segments, so every plot has data


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def reported(build, tmp_path_factory):
    """A Mixtral rewrite 8 -> 4 that moves segments and refits, with its report."""
    built = build("mixtral")
    root = tmp_path_factory.mktemp("report")
    out, report = root / "out", root / "report"
    summary = dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, alpha=ALPHA, refit=True,
                                  fit_tokens=1024, report=report, progress=False)
    return built, out, report, summary


def test_report_numbers_are_the_rewrites(reported):
    built, out, report, summary = reported
    text = (out / "dern_stream.json").read_text()
    record = json.loads(text)
    assert str(built.model_dir.parent) not in text  # the dump, its text and tokenizer by name, not by path
    assert record["calibration"] == built.calib.name
    data = json.loads((report / "report.json").read_text())
    assert summary.report.directory == report and len(summary.report.images) == 6
    h = built.config["intermediate_size"]
    n, k = built.config["num_local_experts"], 4
    assert [entry["layer"] for entry in data["layers"]] == sorted(map(int, record["layers"]))
    for entry in data["layers"]:
        layer = record["layers"][str(entry["layer"])]
        assert entry["kept"] == layer["kept"] and entry["importance"] == layer["importance"]
        # Every pooled segment is in the similarity histogram once; those above alpha are the ones that moved.
        histogram = entry["similarity_histogram"]
        assert sum(histogram) == (n - k) * h
        above = round((ALPHA + 1) / 2 * len(histogram))  # the bin that starts at alpha
        assert sum(histogram[above:]) == entry["segments_reassigned"] == sum(c for _, _, c in entry["transfers"]) > 0
        # k-means clusters: h per rebuilt expert, holding its own h segments and every segment moved into it.
        clustered = [e for e in entry["kept"] if any(t == e for _, t, _ in entry["transfers"])]
        sizes = entry["cluster_sizes"]
        assert sum(count for _, count in sizes) == h * len(clustered)
        assert sum(size * count for size, count in sizes) == h * len(clustered) + entry["segments_reassigned"]
        fit = layer["output_error"]
        assert entry["chosen"] == fit["chosen"] and entry["error_after_refit"] <= entry["error_before_refit"]
    assert set(data["images"]) == {"importance", "reassigned", "pairs", "similarity", "clusters", "error"}
    for name in data["images"].values():
        assert (report / name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_every_image_renders_in_headless_chromium(reported, tmp_path):
    _, _, report, _ = reported
    data = json.loads((report / "report.json").read_text())
    # The page as written, plus a script that lists the images the browser decoded, beside it (same folder).
    probe = "<script>window.onload=()=>{document.body.setAttribute('data-rendered',[...document.images]" \
            ".filter(i=>i.complete&&i.naturalWidth>0).map(i=>i.getAttribute('src')).join(','))}</script>"
    page = report / "index.html"
    check = report / "rendered-check.html"
    check.write_text(page.read_text().replace("</body>", probe + "</body>"))
    try:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                              "--virtual-time-budget=10000", "--dump-dom", check.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        check.unlink()
    rendered = dom.split('data-rendered="', 1)[1].split('"', 1)[0].split(",")
    assert sorted(rendered) == sorted(data["images"].values())
    assert dom.count("<img") == len(data["images"])


def test_report_command_on_a_finished_output(reported, tmp_path):
    _, out, _, _ = reported
    target = tmp_path / "again"
    first = run("report", out, "--to", target)
    assert first.exit_code == 0, first.output
    assert "6 plots" in first.output
    again = run("report", out, "--to", target)
    assert again.exit_code == 2 and "pass --overwrite" in again.stderr
    (target / "pairs.png").unlink()  # an earlier report's own files, whichever are there, are replaced
    assert run("report", out, "--to", target, "--overwrite").exit_code == 0
    assert (target / "pairs.png").is_file() and (target / "index.html").is_file()
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep")
    refused = run("report", out, "--to", stranger, "--overwrite")
    assert refused.exit_code == 2 and "is not a report that dern-stream wrote" in refused.stderr
    assert (stranger / "notes.txt").read_text() == "keep"
    not_output = run("report", tmp_path)
    assert not_output.exit_code == 2 and "no dern_stream.json" in not_output.stderr


def test_a_rewrite_without_data_for_some_plots_says_why(build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, alpha=1.0, recipe="paper", progress=False)
    summary = dern_stream.write_report(out)
    assert summary.directory == out / "report"
    # alpha = 1 moves nothing, so the experts are not even compared.
    assert set(summary.missing) == {"pairs", "clusters", "error", "similarity", "reassigned"}
    page = (out / "report" / "index.html").read_text()
    assert "Not drawn: no segment moved between experts" in page and "eval OUT --reference IN" in page


def test_report_target_refused_before_any_work(build, tmp_path):
    built = build("mixtral")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "a.txt").write_text("mine")
    out = tmp_path / "out"
    result = run("rewrite", built.model_dir, out, "-k", 4, "--calib", built.calib, "--report", taken, "--overwrite")
    assert_clean_failure(result, out, "is not a report that dern-stream wrote")
    result = run("rewrite", built.model_dir, out, "-k", 4, "--calib", built.calib, "--report", built.model_dir / "r")
    assert_clean_failure(result, out, "lies inside the input checkpoint")


def test_without_matplotlib_the_report_is_one_line_before_any_work(build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    result = cli_without("matplotlib", "rewrite", built.model_dir, out, "-k", 4, "--calib", built.calib, "--report",
                         tmp_path / "r")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: the report needs matplotlib: pip install "
                                                  "'dern-stream[report]'"]
    assert not out.exists()


def test_a_report_inside_out_is_the_tools_own(build, tmp_path):
    """OUT/report does not stop a later `rewrite --overwrite` of OUT; a report elsewhere in OUT is refused up front."""
    built = build("mixtral")
    out = tmp_path / "out"
    for _ in range(2):
        result = run("rewrite", built.model_dir, out, "-k", 4, "--calib", built.calib, "--report", out / "report",
                     "--overwrite", "-q")
        assert result.exit_code == 0, result.output
    assert (out / "report" / "index.html").is_file()
    for inside in (out / "config.json", out / "sub" / "deeper"):
        result = run("rewrite", built.model_dir, tmp_path / "o2", "-k", 4, "--calib", built.calib, "--report",
                     str(inside).replace(str(out), str(tmp_path / "o2")))
        assert_clean_failure(result, tmp_path / "o2", "inside OUT, give a new folder directly in it")


def test_report_never_deletes_what_it_did_not_write(reported, tmp_path):
    _, out, report, _ = reported
    target = tmp_path / "rep"
    assert run("report", out, "--to", target).exit_code == 0
    (target / "mynotes.txt").write_text("mine")
    refused = run("report", out, "--to", target, "--overwrite")
    assert refused.exit_code == 2 and "holds mynotes.txt, which a report never writes" in refused.stderr
    assert (target / "mynotes.txt").read_text() == "mine"
    # A rewrite's resume folder beside the target is not the report's to touch.
    partial = tmp_path / ".next.dern-partial"
    partial.mkdir()
    (partial / "layer").write_text("kept")
    assert run("report", out, "--to", tmp_path / "next").exit_code == 0
    assert (partial / "layer").read_text() == "kept"


def test_a_changed_or_garbled_record_is_one_line(reported, tmp_path):
    _, out, _, _ = reported
    changed = tmp_path / "changed"
    shutil.copytree(out, changed, ignore=shutil.ignore_patterns("report"))
    record = json.loads((changed / "dern_stream.json").read_text())
    record["options"]["alpha"] = 0.9
    (changed / "dern_stream.json").write_text(json.dumps(record))
    result = run("report", changed)
    assert result.exit_code == 2 and "was changed since the rewrite wrote it" in result.stderr
    del record["record_checksum"]  # (as dern-stream 0.1 wrote them) and garbled
    record["layers"]["0"]["transfers"] = [["x"]]
    (changed / "dern_stream.json").write_text(json.dumps(record))
    result = run("report", changed)
    assert result.exit_code == 2 and "its entries are not what a rewrite writes" in result.stderr
    assert "Traceback" not in result.output
