"""`dern-stream` command line. Bad input (or an OS error such as a full disk) ends in one line on
stderr and exit status 2."""

from __future__ import annotations

import logging
import signal
import sys

import click

from . import __version__
from .errors import DernError, arg, describe, render


class _Group(click.Group):
    """Turn DernError into one line (no traceback) unless --debug, naming arguments by their flags."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a bad or missing option: one line too, naming the command's --help
            if ctx.params.get("debug"):
                raise
            where = f" (see: dern-stream {e.ctx.info_name} --help)" if e.ctx is not None and e.ctx.parent else ""
            click.echo(f"error: {e.format_message()}{where}", err=True)
            sys.exit(2)
        except (DernError, OSError) as e:
            if ctx.params.get("debug"):
                raise
            # OSError: a full disk or a permission problem mid-run; the staged output is already gone.
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            click.echo(f"error: {render(describe(e), flag_names(command))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            click.echo("error: interrupted" + _RESUME.get(ctx.invoked_subcommand, ""), err=True)
            sys.exit(130)
        except RuntimeError as e:  # torch.OutOfMemoryError, by name: this module does not import torch
            if ctx.params.get("debug") or type(e).__name__ != "OutOfMemoryError":
                raise
            # torch's message: "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..." (the first two)
            what = ". ".join(str(e).strip().split(". ")[:2]).splitlines()[0] if str(e).strip() else "out of memory"
            click.echo(f"error: the device ran out of memory ({what}); "
                       + _OUT_OF_MEMORY.get(ctx.invoked_subcommand, "free the GPU's memory, or pass --device cpu"),
                       err=True)
            sys.exit(2)


_RESUME = dict.fromkeys(("rewrite", "dump"), "; finished layers are kept: run the same command again to resume")
# The device is part of what a resumed rewrite must match: on the CPU it starts over.
_OUT_OF_MEMORY = {command: "finished layers are kept: free the GPU's memory and run the same command again to resume, "
                           f"or {on_cpu}"
                  for command, on_cpu in (("rewrite", "start over on the CPU with --device cpu --restart"),
                                          ("dump", "pass --device cpu"))}


def flag_names(command: click.Command | None) -> dict[str, str]:
    """A command's options as Python keyword -> flag (`json_path` -> `--json`): how the arguments a
    DernError names (errors.arg) are shown on the command line; any other is `--keyword`."""
    return {p.name: p.opts[0] for p in getattr(command, "params", ()) if isinstance(p, click.Option) and p.name}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="dern-stream")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(debug: bool) -> None:
    """Shrink Mixture-of-Experts checkpoints out of core with DERN."""
    # `kill` (SIGTERM, also what job schedulers and containers send) stops a run as Ctrl-C does: the
    # finished layers are kept and the one-line message says how to resume.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("dern_stream").setLevel(logging.INFO)


def _rewrite_options(f):
    """--experts, --calib and every RewriteOptions field as an option (options.py holds their help)."""
    from .options import option_fields

    types = {"int": int, "float": float}
    for spec in reversed(option_fields()):
        meta, name = spec.metadata, spec.name.replace("_", "-")
        shown = meta["shown"]
        help_text = meta["help"] + (f" [default: {shown}]" if shown is not None else "")
        if meta["flag"]:
            f = click.option(f"--{name}/--no-{name}", default=None, help=help_text)(f)
            continue
        kind = click.Choice(meta["choices"]) if meta["choices"] else (
            meta["cli_type"] or types.get(str(spec.type).split(" ")[0], str))
        f = click.option(f"--{name}", type=kind, default=None, help=help_text)(f)
    f = click.option("--calib", type=click.Path(), help="Calibration dump (zarr) of MoE-layer inputs; required "
                     "unless --importance router-norm.")(f)
    return click.option("--experts", "-k", type=int, required=True, help="Routed experts to keep per MoE layer (K).")(f)


def _revision(what: str = "IN"):
    return click.option("--revision", metavar="REV",
                        help=f"Branch, tag or commit of {what} when it is a Hugging Face repo id [default: main].")


def _run_options(f):
    """What rewrite takes beyond the method's options (plan takes them too, to check them as rewrite would)."""
    for option in reversed([
        _revision(),
        click.option("--push-to-hub", metavar="REPO",
                     help="Then verify OUT against IN and, if it passes, upload it to this Hugging Face repo (created "
                          "if needed)."),
        click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
        click.option("--restart", is_flag=True,
                     help="Discard the finished layers of an interrupted run into OUT instead of resuming from them."),
        click.option("--workers", type=int, default=1, show_default=True,
                     help="Run the layers in this many local worker processes (each holds one layer)."),
        click.option("--ray", "ray_address", metavar="ADDRESS",
                     help="Run the layers as tasks on this Ray cluster (auto, or ray://host:10001); every node must "
                          "see IN, the dump and OUT at the same paths. Needs dern-stream[ray]."),
        click.option("--report", "report_dir", metavar="DIR", type=click.Path(file_okay=False),
                     help="Also write a report of what the rewrite did (HTML page with plots, report.json) into DIR. "
                          "Needs dern-stream[report]."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
    ]):
        f = option(f)
    return f


@main.command()
@click.argument("src", metavar="IN")
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False))
@_rewrite_options
@_run_options
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is the output of an earlier rewrite.")
def rewrite(src, out, experts, calib, revision, push_to_hub, private, overwrite, restart, workers, ray_address,
            report_dir, quiet, **options) -> None:
    """Rewrite checkpoint IN (directory or Hub repo id) into OUT with K experts per MoE layer.

    Run again after an interruption, with the same arguments, to continue from the last finished layer."""
    from .api import rewrite as run_rewrite  # torch loads only for commands that need it

    summary = run_rewrite(src, out, experts=experts, calib=calib, overwrite=overwrite, restart=restart,
                          progress=not quiet, workers=workers, ray=ray_address, revision=revision,
                          push_to_hub=push_to_hub, private=private, report=report_dir, **options)
    click.echo(str(summary))


@main.command()
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--to", "directory", metavar="DIR", type=click.Path(file_okay=False), show_default="OUT/report",
              help="Where to write the report.")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it is an earlier report.")
def report(out, directory, overwrite) -> None:
    """Write the report of the finished rewrite OUT (from its dern_stream.json): an HTML page with plots of
    the experts' importance and the kept ones, the segments reassigned, the similarities against alpha, the
    k-means cluster sizes and the per-layer output error, and report.json. Needs dern-stream[report]."""
    from .publish.report import write_report

    click.echo(str(write_report(out, directory, overwrite=overwrite)))


@main.command()
@click.argument("src", metavar="IN")
@click.argument("out", metavar="[OUT]", required=False, type=click.Path(file_okay=False))
@_rewrite_options
@_run_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the whole plan as JSON here (every tensor's shard and byte offset).")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it is an earlier plan; with OUT, as "
              "rewrite --overwrite: OUT may be the output of an earlier rewrite.")
def plan(src, out, experts, calib, revision, push_to_hub, private, restart, workers, ray_address, report_dir, quiet,
         json_path, overwrite, **options) -> None:
    """Show what `rewrite IN OUT --experts K` with the same options would do, without writing anything: the layers
    and experts that change, the output size and free disk it needs, the peak memory and the compute per layer.
    Every rewrite option is taken and checked as rewrite checks it; with OUT, also OUT's location, a partial output
    there and the room on its disk. Without --calib the experts are ranked by router norm (a rewrite uses the
    dump's routing statistics)."""
    from .api import plan as make_plan
    from .rewriter.plan_record import describe

    made = make_plan(src, out, experts=experts, calib=calib, json_path=json_path, overwrite=overwrite,
                     restart=restart, progress=not quiet, workers=workers, ray=ray_address, revision=revision,
                     push_to_hub=push_to_hub, private=private, report=report_dir, **options)
    click.echo(describe(made))


def _text_options(num_tokens: int, seq_len: int):
    """--text/--dataset/--tokenizer/--num-tokens/--seq-len, shared by dump and eval."""
    def wrap(f):
        for option in reversed([
            click.option("--text", type=click.Path(dir_okay=False),
                         help="Text file: plain, or .jsonl with a 'text' field per line."),
            click.option("--dataset", help="A datasets dataset NAME[:split] with a 'text' field (needs datasets)."),
            click.option("--tokenizer", type=click.Path(), show_default="the checkpoint's",
                         help="Tokenizer directory."),
            click.option("--num-tokens", type=int, default=num_tokens, show_default=True, help="Tokens to use."),
            click.option("--seq-len", type=int, default=seq_len, show_default=True, help="Tokens per sequence."),
            click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per forward."),
            click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda:N."),
            click.option("--dtype", default="auto", show_default=True,
                         help="Compute dtype: auto (as stored), float32, bfloat16, float16."),
            click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
        ]):
            f = option(f)
        return f
    return wrap


@main.command()
@click.argument("src", metavar="IN")
@click.argument("out", metavar="DUMP", type=click.Path())
@_text_options(num_tokens=262144, seq_len=2048)
@click.option("--overwrite", is_flag=True, help="Start DUMP again if it is an earlier dump (else an interrupted dump "
              "resumes).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Split the sequences among this many worker processes (a GPU each where there are that many).")
@_revision()
def dump(src, out, text, dataset, tokenizer, num_tokens, seq_len, batch_size, device, dtype, quiet, overwrite,
         workers, revision) -> None:
    """Write the calibration dump DUMP (zarr) of checkpoint IN's MoE-layer inputs, one layer at a time.

    Run again after an interruption, with the same arguments, to continue from the last finished layer."""
    from .calib.checks import check_dump_arguments

    check_dump_arguments(src, out, text=text, dataset=dataset, tokens_given=False, tokenizer=tokenizer,
                         num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype,
                         workers=workers, revision=revision)  # before torch loads: a refusal answers at once
    from .calib.dump import dump as run_dump

    summary = run_dump(src, out, text=text, dataset=dataset, tokenizer=tokenizer, num_tokens=num_tokens,
                       seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype, overwrite=overwrite,
                       progress=not quiet, workers=workers, revision=revision)
    click.echo(str(summary))


@main.command(name="eval")
@click.argument("src", metavar="CKPT")
@_text_options(num_tokens=131072, seq_len=2048)
@click.option("--reference", metavar="IN", help="The checkpoint CKPT was made from: with --text/--dataset, the KL "
              "divergence and top-1 agreement with it; with --calib, the per-MoE-layer output error.")
@click.option("--calib", type=click.Path(),
              help="Dump whose inputs the per-layer error is measured on (with --reference).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it is an earlier eval report.")
@_revision("CKPT")
@click.option("--reference-revision", metavar="REV",
              help="Branch, tag or commit of --reference when it is a Hugging Face repo id [default: main].")
@click.option("--tasks", metavar="NAME[,NAME...]", help="Score lm-evaluation-harness tasks instead (log-likelihood "
              "tasks: multiple choice, rolling perplexity), out of core; with --reference, both and their paired "
              "difference. Needs dern-stream[eval].")
@click.option("--include-path", type=click.Path(file_okay=False), metavar="DIR",
              help="With --tasks: a folder of lm-eval task YAML files of your own.")
@click.option("--num-fewshot", type=int, metavar="N", help="With --tasks: few-shot examples per item [default: the "
              "task's].")
@click.option("--limit", type=float, metavar="N", help="With --tasks: only the first N items of each task (a share "
              "of them below 1).")
def eval_(src, text, dataset, tokenizer, num_tokens, seq_len, batch_size, device, dtype, quiet, reference, calib,
          json_path, overwrite, revision, reference_revision, tasks, include_path, num_fewshot, limit) -> None:
    """Evaluate checkpoint CKPT out of core: perplexity on --text/--dataset (up to --num-tokens); with
    --reference too, the KL divergence from the reference's next-token distribution and the top-1 agreement;
    with --reference and --calib, the per-MoE-layer output error on the inputs cached in the dump. With --tasks,
    lm-evaluation-harness task scores instead (--batch-size requests per batch)."""
    if tasks is not None:
        from .evaluation.checks import check_task_arguments

        check_task_arguments(src, tasks=tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                             text=text, dataset=dataset, calib=calib, tokenizer=tokenizer, batch_size=batch_size,
                             reference=reference, device=device, dtype=dtype, json_path=json_path,
                             overwrite=overwrite, revision=revision, reference_revision=reference_revision)
        from .evaluation.task_scores import score_tasks

        click.echo(str(score_tasks(src, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                                   batch_size=batch_size, device=device, dtype=dtype, tokenizer=tokenizer,
                                   reference=reference, json_path=json_path, overwrite=overwrite, progress=not quiet,
                                   revision=revision, reference_revision=reference_revision,
                                   echo=lambda line: click.echo(line, err=True))))
        return
    for name, value in (("include_path", include_path), ("num_fewshot", num_fewshot), ("limit", limit)):
        if value is not None:
            raise DernError(f"{arg(name)} goes with {arg('tasks')}")
    from .evaluation.checks import check_eval_arguments

    check_eval_arguments(src, text=text, dataset=dataset, tokens_given=False, tokenizer=tokenizer,
                         num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size, reference=reference,
                         calib=calib, device=device, dtype=dtype, json_path=json_path, overwrite=overwrite,
                         revision=revision, reference_revision=reference_revision)
    from .evaluation.evaluation import evaluate

    report = evaluate(src, text=text, dataset=dataset, tokenizer=tokenizer, num_tokens=num_tokens, seq_len=seq_len,
                      batch_size=batch_size, reference=reference, calib=calib, device=device, dtype=dtype,
                      json_path=json_path, overwrite=overwrite, progress=not quiet, revision=revision,
                      reference_revision=reference_revision)
    click.echo(str(report))


@main.command(name="verify")
@click.argument("out", metavar="OUT")
@click.option("--against", metavar="IN", help="The input checkpoint: tensors the rewrite leaves unchanged must be "
              "byte-identical to it.")
@_revision("--against")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify_(out, against, revision, quiet) -> None:
    """Check that checkpoint OUT is whole: config-implied tensors present with the right shapes, index and
    shards in agreement, no NaN/Inf, dern_stream.json consistent; exit status 1 on any problem."""
    from .publish.checks import check_verify_arguments

    check_verify_arguments(out, against, revision)  # before torch loads
    from .publish.verify import verify

    report = verify(out, against=against, progress=not quiet, revision=revision)
    click.echo(str(report))
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False))
@click.argument("repo", metavar="REPO")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet).")
@click.option("--revision", metavar="BRANCH",
              help="Upload to this branch (created from main if needed) [default: main].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar for the verification.")
def push(out, repo, private, revision, quiet) -> None:
    """Verify rewrite output OUT (every byte against the checksums in its dern_stream.json) and, if it passes,
    upload it to the Hugging Face model repo REPO (created if needed). Nothing is uploaded otherwise."""
    from .publish.hub import push as run_push

    click.echo(f"verified and pushed: {run_push(out, repo, private=private, revision=revision, progress=not quiet)}")


@main.command(name="card")
@click.argument("out", metavar="OUT")
@click.option("--eval", "evals", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="An `eval --json` report to show in the card's evaluation table (repeatable); without --eval "
                   "the card keeps the results given before.")
def card_(out, evals) -> None:
    """Rebuild OUT/README.md, the model card of rewrite output OUT, from its dern_stream.json (the base model's
    card in it is kept), and record its checksum there so that verify still passes."""
    from .publish.card import card

    click.echo(str(card(out, evals=list(evals) or None)))


if __name__ == "__main__":
    main()
