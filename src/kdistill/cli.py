"""The command line: a thin shell over the Python API (`kdistill.load_config`, `kdistill.run`)."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kdistill.errors import KDistillError

# rich_markup_mode=None: help texts are plain (`[RECIPE.yaml]` is not a style tag).
app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Knowledge distillation for PyTorch: teacher -> student, measured.")
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough that the table is never cut
    console.width = 200
err_console = Console(stderr=True)
DEBUG = {"on": False}

RecipeArg = Annotated[
    list[str] | None,
    typer.Argument(help="[RECIPE.yaml] [key.path=value ...]; no recipe: the built-in default"),
]


def _split(args: list[str] | None) -> tuple[str | None, list[str]]:
    """The first argument is the recipe unless it is already a key=value override."""
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _print_table(rows: dict) -> None:
    from kdistill.report.markdown import summary_table

    head, *body = summary_table(rows)
    table = Table(*head)
    for line in body:
        table.add_row(*line)
    console.print(table)


OVERRIDES_HELP = (
    "\n\nOverrides: after the recipe, any number of key.path=value (a YAML value), applied "
    "to the effective recipe, e.g. train.seeds=[0,1,2] train.epochs=20 method.temperature=8 "
    "'method.alpha={kind: linear, start: 0.9, end: 0.5}' data.name=mnist data.val_size=5000 "
    "teacher.model.weights=t.safetensors student.model.args.hidden=[256,256] name=mine. "
    "A new method.name or data.name starts that section from its own defaults."
    "\n\nEvery key with its type and default: docs/recipes.md; a method's keys: "
    "kdistill methods NAME.")


@app.command(help="Run a recipe: teach -> cache -> baseline -> distill -> evaluate -> report."
             + OVERRIDES_HELP)
def run(args: RecipeArg = None) -> None:
    from kdistill.config import load_config
    from kdistill.pipeline.order import run as run_pipeline

    recipe, overrides = _split(args)
    cfg = load_config(recipe, overrides)
    result = run_pipeline(cfg, echo=lambda line: console.print(line, highlight=False))
    if not result.rows:  # under torchrun only rank 0 evaluates: the other ranks stay quiet
        return
    _print_table(result.rows)
    console.print(f"report: {result.run_dir / 'report.md'}")


@app.command(help="Check a recipe: parse it and build data and models, without training. "
             "A generate recipe is checked as `kdistill generate` would read it."
             + OVERRIDES_HELP)
def validate(
    args: RecipeArg = None,
    build: Annotated[bool, typer.Option(
        "--build", help="also build arch: custom models (runs their code; without it the "
        "target is imported and checked, never called)")] = False,
) -> None:
    from kdistill.build import validate as validate_recipe
    from kdistill.config import load_config, read_tree
    from kdistill.config.generate import is_generate_recipe, load_generate_config

    recipe, overrides = _split(args)
    if recipe is not None and is_generate_recipe(read_tree(recipe)):
        from kdistill.pipeline.generate import validate_generate

        summary = validate_generate(load_generate_config(recipe, overrides))
        console.print(f"ok: {recipe} (generate: {summary})", highlight=False)
        return
    cfg = load_config(recipe, overrides)
    splits = validate_recipe(cfg, build_custom=build)
    console.print(f"ok: {recipe or 'default recipe'} ({splits.name}, method {cfg.method.name})")


@app.command(help="Estimate each stage's peak memory for the recipe's device, precision and "
             "batch, before a run: parameters, gradients, optimiser state, activations "
             "(probed), the teacher, its cache, loss buffers; the fields to change when it "
             "does not fit. Exit 1 when it does not fit." + OVERRIDES_HELP)
def plan(args: RecipeArg = None) -> None:
    from kdistill.planning import plan_command

    recipe, overrides = _split(args)
    code = plan_command(recipe, overrides,
                        echo=lambda line: console.print(line, highlight=False, markup=False))
    raise typer.Exit(code)


@app.command()
def generate(
    args: Annotated[list[str] | None,
                    typer.Argument(help="RECIPE.yaml, then key.path=value overrides")] = None,
) -> None:
    """Run a teacher over a prompt set and write its answers as JSONL (resumable)."""
    from kdistill.config.generate import load_generate_config
    from kdistill.pipeline.generate import run_generate

    recipe, overrides = _split(args)
    cfg = load_generate_config(recipe, overrides)
    result = run_generate(cfg, echo=lambda line: console.print(line, highlight=False))
    console.print(
        f"{result.out_path}: {result.n_generated} prompt(s) answered now, "
        f"{result.n_skipped} already there; {result.new_tokens} new tokens in "
        f"{result.seconds:.1f} s ({result.tokens_per_s:.1f} tokens/s)", highlight=False)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories (runs/<name>)")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="the HTML file; default <run_dir>/report.html, required for several"
    )] = None,
) -> None:
    """Write report.html for a run, or one page comparing several runs."""
    from kdistill.report.html import write_html_report

    console.print(f"report: {write_html_report(run_dirs, out)}", highlight=False)


@app.command()
def tokenizer(
    args: RecipeArg = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="tokens, EOS included")] = 8192,
    out: Annotated[Path, typer.Option("--out", "-o", help="a new folder for the tokenizer")
                   ] = Path("tokenizer"),
) -> None:
    """Learn a byte-level BPE vocabulary on the recipe's training documents (a student's own
    tokenizer; distil it from another tokenizer's teacher with arch: projected_lm)."""
    from kdistill.config import load_config
    from kdistill.data.bpe import train_bpe
    from kdistill.errors import ConfigError

    recipe, overrides = _split(args)
    cfg = load_config(recipe, overrides)
    documents = getattr(cfg.data, "training_documents", None)
    if documents is None:
        raise ConfigError("data.name", f"{cfg.data.name!r} has no documents to learn a "
                          "vocabulary from; use stdlib_docs, fortunes or text_files")
    texts = documents()
    tok = train_bpe(texts, vocab_size, out)
    console.print(f"{out}: {len(tok):,} tokens learned on {len(texts):,} training documents; "
                  f"name it as data.tokenizer: {out}", highlight=False)


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(
        help="a method: print its recipe keys (type, default, description)")] = None,
) -> None:
    """List the distillation methods, or one method's parameters."""
    from kdistill.errors import ConfigError
    from kdistill.methods import METHODS
    from kdistill.report.recipes_doc import method_intro, method_parameters

    def data(tasks: tuple[str, ...]) -> str:
        return ", ".join("text (causal LM)" if t == "causal_lm" else t for t in tasks)

    if name is None:
        table = Table("method", "data", "paper")
        for key, cls in METHODS.items():
            table.add_row(key, data(cls.tasks), cls.paper)
        console.print(table)
        console.print("`kdistill methods NAME`: that method's recipe keys.", highlight=False,
                      markup=False)
        return
    if name not in METHODS:
        raise ConfigError("method.name", f"unknown method '{name}'; one of "
                          f"{', '.join(METHODS)}")
    cls = METHODS[name]
    console.print(f"method.name: {name} ({data(cls.tasks)}). {method_intro(name)}",
                  highlight=False, markup=False)
    console.print(f"Paper: {cls.paper}", highlight=False, markup=False)
    rows = method_parameters(name)
    if not rows:
        console.print("No further keys.", highlight=False)
        return
    table = Table("key", "type", "default", "description")
    for row in rows:
        table.add_row(*row)
    console.print(table, markup=False)


@app.callback(invoke_without_command=True)
def _options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit",
                                          is_eager=True)] = False,
) -> None:
    if version:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        try:
            console.print(f"kdistill {package_version('kdistill')}", highlight=False)
        except PackageNotFoundError:  # running from a source tree without an install
            console.print("kdistill (not installed)", highlight=False)
        raise typer.Exit()
    if ctx.invoked_subcommand is None:  # `kdistill` alone: the commands, not an error
        console.print(ctx.get_help(), highlight=False)
        raise typer.Exit()
    DEBUG["on"] = debug


def main() -> None:
    """Entry point: user errors become one line on stderr with exit code 2 (input) or 1.

    Usage errors (an unknown command or option) are typer's own: a message and exit code 2.
    """
    try:
        app()
    except KDistillError as exc:
        if DEBUG["on"]:
            traceback.print_exc()
        err_console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
