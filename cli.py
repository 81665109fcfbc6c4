"""The onnxproxy command line: parses options, calls the library, prints. No logic of its own.

torch and onnx2torch are imported inside the commands that need them, so `--help` stays fast.
"""

import functools
import json
import sys
from pathlib import Path

import click

from onnxproxy import __version__
from onnxproxy.errors import UserError
from onnxproxy.settings import METHODS, SLOPE_SCHEDULES, Settings


class _Group(click.Group):
    """Prints a UserError as one line and exits with its status, instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(error.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxproxy")
def main():
    """Find the inputs that drive any unit of an ONNX classifier highest (ProxyGrad activation
    maximization), and prove every number with onnxruntime on the unchanged model."""


def _input_options(command):
    """--input-shape and --input, accepted by every command that loads a model."""
    command = click.option("--input", "input_name", help="Which model input to use, for models with several.")(command)
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
                        help="Fix free input dimensions, e.g. x:1,3,48,192.")(command)


def _warn(message):
    click.echo(f"Warning: {message}", err=True)


def _optimization_options(command):
    """The optimizer and validation options that maximize and audit share, handed over as one Settings."""
    options = [
        click.option("--backward-slope", type=float, default=Settings.backward_slope, show_default=True,
                     help="Negative slope of the rectifiers in ProxyGrad's backward pass."),
        click.option("--slope-schedule", type=click.Choice(SLOPE_SCHEDULES), default=Settings.slope_schedule,
                     show_default=True, help="decay: linear to the forward slope by mid-run, then ordinary "
                                             "gradients. Defaults chosen by benchmark: docs/benchmarks.md."),
        click.option("--steps", type=int, default=Settings.steps, show_default=True),
        click.option("--lr", type=float, default=Settings.lr, show_default=True),
        click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=Settings.optimizer,
                     show_default=True, help="sgd is the paper's update x <- clip(x + lr * grad)."),
        click.option("--seeds", type=int, default=Settings.seeds, show_default=True,
                     help="Independent starts per unit."),
        click.option("--proxygrad-seeds", type=int, default=Settings.proxygrad_seeds, show_default=True,
                     help="In a portfolio, how many of each unit's starts use ProxyGrad (the others vanilla)."),
        click.option("--seed", type=int, default=Settings.seed, show_default=True),
        click.option("--input-range", nargs=2, type=float, default=Settings.input_range, show_default=True,
                     metavar="LO HI", help="Box constraint on the model's input tensor."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--atol", type=float, default=Settings.atol, show_default=True, help="Validation tolerance."),
        click.option("--rtol", type=float, default=Settings.rtol, show_default=True, help="Validation tolerance."),
    ]

    @functools.wraps(command)
    def with_settings(*args, backward_slope, slope_schedule, steps, lr, optimizer, seeds, proxygrad_seeds, seed,
                      input_range, device, atol, rtol, **kwargs):
        from onnxproxy.run import resolve_device

        settings = Settings(steps=steps, lr=lr, optimizer=optimizer, backward_slope=backward_slope,
                            slope_schedule=slope_schedule, seeds=seeds, proxygrad_seeds=proxygrad_seeds, seed=seed,
                            input_range=tuple(input_range), device=resolve_device(device), atol=atol, rtol=rtol)
        return command(*args, settings=settings, **kwargs)

    for option in reversed(options):
        with_settings = option(with_settings)
    return with_settings


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--node", help="Show only this node (the addressing every command's --node uses).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_input_options
def inspect_command(model, node, as_json, input_shapes, input_name):
    """List MODEL's inputs, outputs and every node with its output shape, what the repair pass did,
    and whether its torch conversion matches onnxruntime."""
    from onnxproxy.graph import load_model, parse_input_shape
    from onnxproxy.inspect import build_report, render_text

    report = build_report(load_model(model, parse_input_shape(input_shapes), input_name), node)
    click.echo(json.dumps(report, indent=2) if as_json else render_text(report))
    if not report["conversion"]["matches_onnxruntime"]:
        raise UserError(report["conversion"]["error"])


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--node", help="Target: NODE or NODE:UNITS (e.g. conv3:0-7). Default for the embedded model: conv3.")
@click.option("--units", help="Units: 12, 0-15, 0,3,7 or all (instead of NODE:UNITS). Default: unit 0.")
@click.option("--objective", type=click.Choice(["channel", "neuron", "logit"]),
              help="channel mean (default for 4-D), one neuron (--position), or the unit of a (N, K) tensor.")
@click.option("--position", help="Y,X of the neuron for --objective neuron (default: the centre).")
@click.option("--method", type=click.Choice([*METHODS, "compare"]), default=METHODS[0], show_default=True,
              help="portfolio: most starts vanilla, --proxygrad-seeds with ProxyGrad, the best kept (the "
                   "benchmarks' winner); "
                   "compare: vanilla and proxygrad side by side from the same starts and budget.")
@_optimization_options
@click.option("--out", type=click.Path(path_type=Path), help="Output folder [default: runs/MODEL-NODE-TIME].")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the results document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_input_options
def maximize(model, node, units, objective, position, method, settings, out, force, as_json, quiet, input_shapes,
             input_name):
    """Find inputs that drive units of MODEL highest, with ProxyGrad, validated by onnxruntime.

    MODEL defaults to the embedded digits CNN (models/digits_cnn.onnx).
    """
    from onnxproxy import run
    from onnxproxy.graph import parse_input_shape

    request = run.Request(model, node, units, objective, _parse_position(position), method, settings, out, force,
                          quiet, parse_input_shape(input_shapes), input_name)
    document, folder = run.maximize(request, _warn)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo("\n".join(run.summary_lines(document)))
        click.echo(f"Wrote {folder}")
    if not document["validated"]:
        click.echo("FAILED: not every result is validated by onnxruntime (a MISMATCH, or no finite activation at "
                   "all; see results.json)", err=True)
        sys.exit(1)


def _parse_position(text):
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--position {text}: expected integers like 3,4") from None


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--outputs", default="all", show_default=True, metavar="final|all|rectifiers|NAME,...",
              help="Which tensors to compare: the graph outputs, every intermediate tensor, the rectifiers' "
                   "outputs, or the named ones.")
@click.option("--atol", type=float, default=Settings.atol, show_default=True)
@click.option("--rtol", type=float, default=Settings.rtol, show_default=True)
@click.option("--tol", "tolerances", multiple=True, metavar="NAME:ATOL", help="atol for one tensor (repeatable).")
@click.option("--seed", type=int, default=Settings.seed, show_default=True)
@click.option("--val-range", nargs=2, type=float, default=Settings.input_range, show_default=True, metavar="LO HI",
              help="Range of the uniform random inputs.")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Random inputs to run.")
@click.option("--load-inputs", "inputs_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Inputs from an .npz (key: the input's name, or a single array) instead of random ones.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write JUnit XML, one testcase per check.")
@_input_options
def check(model, outputs, atol, rtol, tolerances, seed, val_range, batch, inputs_file, json_path, junit_path,
          input_shapes, input_name):
    """CI gate: MODEL loads, its torch conversion matches onnxruntime on the unchanged model tensor by tensor,
    and the proxy graph keeps the forward pass and passes gradients to the input.

    Exit status: 0 all checks passed, 1 a check failed, 2 usage error.
    """
    from onnxproxy.check import CheckOptions, run_checks
    from onnxproxy.graph import parse_input_shape

    options = CheckOptions(outputs, atol, rtol, tolerances, seed, tuple(val_range), batch, inputs_file,
                           parse_input_shape(input_shapes), input_name)
    report = run_checks(model, options)
    click.echo("\n".join(report.lines()))
    if json_path:
        report.write_json(json_path)
    if junit_path:
        report.write_junit(junit_path)
    sys.exit(0 if report.passed else 1)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), metavar="DATA.npz",
              help="Training data: x (the model's input layout) and y (integer labels).")
@click.option("--test-data", type=click.Path(path_type=Path), metavar="T.npz",
              help="Data to report accuracy on [default: the validation split].")
@click.option("--node", help="The logits [default: the model's output, or the input of a final Softmax].")
@click.option("--reinit", is_flag=True, help="Train the architecture from fresh weights instead of fine-tuning.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="adam", show_default=True,
              help="sgd uses momentum 0.9.")
@click.option("--backward-slope", type=float, default=Settings.backward_slope, show_default=True,
              help="Negative slope of the rectifiers in the backward pass of ProxyGrad.")
@click.option("--method", type=click.Choice(["proxygrad", "standard", "compare"]), default="proxygrad",
              show_default=True, help="compare trains both from identical weights and data order.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Runs per method (seeds 0..K-1).")
@click.option("--val-split", type=float, default=0.1, show_default=True,
              help="Fraction of DATA held out to keep the best epoch (0: keep the last).")
@click.option("-o", "onnx_out", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.onnx",
              help="Also write the trained model here (one method, one seed).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder [default: runs/MODEL-train-TIME].")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the results document on stdout.")
@_input_options
def train(model, data, test_data, node, reinit, epochs, batch_size, lr, optimizer, backward_slope, method, seeds,
          val_split, onnx_out, out, force, as_json, input_shapes, input_name):
    """Train MODEL's weights with ProxyGrad (or the standard way, or both) and export them back to ONNX with
    the original rectifiers, re-scored by onnxruntime.

    Exit status: 0 done, 1 onnxruntime disagrees with torch, 2 usage error, 130 interrupted (Ctrl-C writes a
    checkpoint and the best model so far).
    """
    from onnxproxy import train as training
    from onnxproxy.graph import parse_input_shape

    settings = training.TrainSettings(epochs, batch_size, lr, optimizer, backward_slope, method, seeds, val_split,
                                      reinit)
    request = training.Request(model, data, test_data, node, settings, onnx_out, out, force,
                               parse_input_shape(input_shapes), input_name)
    outcome = training.train(request)
    if as_json:
        click.echo(json.dumps(outcome.document, indent=2))
    else:
        click.echo("\n".join(training.summary_lines(outcome.document)))
        click.echo(f"Wrote {outcome.folder}")
    if outcome.interrupted:
        click.echo("Interrupted: wrote checkpoint.pt and the best model so far", err=True)
        sys.exit(130)
    if not outcome.document["validated"]:
        click.echo("FAILED: onnxruntime's accuracy differs from torch's for some runs (see results.json)", err=True)
        sys.exit(1)


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--nodes", metavar="NODE,NODE,...",
              help="Nodes to audit [default: every rectifier's input (each layer's pre-activation) and the logits].")
@click.option("--units-per-node", default="8", show_default=True, metavar="K|all",
              help="K units spread evenly over each node, or all of them.")
@click.option("--methods", default="vanilla,proxygrad", show_default=True, help="Both run from the same starts.")
@_optimization_options
@click.option("--workers", type=int, default=1, show_default=True, help="Processes running units in parallel.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder [default: runs/MODEL-audit-TIME].")
@click.option("--resume", is_flag=True, help="Continue the audit in --out, skipping the units it finished.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_input_options
def audit(model, nodes, units_per_node, methods, settings, workers, out, resume, force, quiet, input_shapes,
          input_name):
    """Maximize a sample of units of every layer of MODEL with vanilla gradient ascent and with ProxyGrad, and
    report per layer how high each gets, where ProxyGrad is higher and which units are dead.

    Writes audit.json, audit.csv, images/ and report.html into --out. Exit status: 0 done, 1 onnxruntime
    disagrees with torch somewhere, 2 usage error, 130 interrupted (rerun with --resume).
    """
    from onnxproxy import audit as auditing
    from onnxproxy.graph import parse_input_shape

    request = auditing.AuditRequest(model, nodes, units_per_node, methods, settings, workers, out, resume, force,
                                    quiet, parse_input_shape(input_shapes), input_name)
    document, folder = auditing.run_audit(request, _warn)
    click.echo("\n".join(auditing.summary_lines(document)))
    click.echo(f"Wrote {folder}/report.html")
    if not document["validated"]:
        click.echo("FAILED: torch and onnxruntime disagree on some activations (see audit.json)", err=True)
        sys.exit(1)


def _rectifier_kinds(ctx, param, value):
    from onnxproxy.proxy import RECTIFIER_KINDS, check_rectifier_kinds

    if value is None:
        return RECTIFIER_KINDS
    try:
        return check_rectifier_kinds(kind.strip().lower() for kind in value.split(","))
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.onnx",
              help="Where to write the proxy model (replaced only once complete).")
@click.option("--backward-slope", type=float, default=Settings.backward_slope, show_default=True,
              help="Negative slope of the rewritten rectifiers in the backward pass (stored in the file; "
                   "maximize's schedules change it per step). Default chosen by benchmark: docs/benchmarks.md.")
@click.option("--rectifiers", callback=_rectifier_kinds, metavar="KIND,...",
              help="Which rectifiers to rewrite, from relu, leakyrelu, prelu, clip (Clip with min 0) [default: all].")
@_input_options
def proxy(model, output, backward_slope, rectifiers, input_shapes, input_name):
    """Write the proxy of MODEL: every rectifier becomes a dual-slope op, whose forward is exactly the original
    op and whose backward has slope B on the negative side. onnxruntime and Netron run and show it."""
    from onnxproxy import proxy as dual_slope
    from onnxproxy.graph import load_model, parse_input_shape

    loaded = load_model(model, parse_input_shape(input_shapes), input_name)
    proxy_model, rewritten = dual_slope.build_proxy(loaded.repaired, backward_slope, rectifiers)
    dual_slope.save_proxy(proxy_model, output)
    if not rewritten:
        _warn(f"{model} has no rectifier of the kinds {','.join(rectifiers)}: the proxy computes the same gradients "
              "as the original, and ProxyGrad equals ordinary gradient ascent")
    for op_type, count in sorted(rewritten.items()):
        click.echo(f"{op_type:10s} {count:4d} rewritten")
    click.echo(f"Wrote {output}: {sum(rewritten.values())} dual-slope nodes, backward slope {backward_slope}")


if __name__ == "__main__":
    main()
