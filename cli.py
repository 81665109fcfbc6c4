"""The onnxproxy command line: parses options, calls the library, prints. No logic of its own.

torch and onnx2torch are imported inside the commands that need them, so `--help` stays fast.
"""

import json
import sys
from pathlib import Path

import click

from onnxproxy import __version__
from onnxproxy.errors import UserError
from onnxproxy.settings import Settings


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


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--node", help="Target: NODE or NODE:UNITS (e.g. conv3:0-7). Default for the embedded model: conv3.")
@click.option("--units", help="Units: 12, 0-15, 0,3,7 or all (instead of NODE:UNITS). Default: unit 0.")
@click.option("--objective", type=click.Choice(["channel", "neuron", "logit"]),
              help="channel mean (default for 4-D), one neuron (--position), or the unit of a (N, K) tensor.")
@click.option("--position", help="Y,X of the neuron for --objective neuron (default: the centre).")
@click.option("--method", type=click.Choice(["proxygrad", "vanilla", "compare"]), default="proxygrad",
              show_default=True, help="compare runs both from the same starts and budget.")
@click.option("--backward-slope", type=float, default=Settings.backward_slope, show_default=True,
              help="Negative slope of the rectifiers in the backward pass (provisional default).")
@click.option("--steps", type=int, default=Settings.steps, show_default=True)
@click.option("--lr", type=float, default=Settings.lr, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=Settings.optimizer, show_default=True,
              help="sgd is the paper's update x <- clip(x + lr * grad).")
@click.option("--seeds", type=int, default=Settings.seeds, show_default=True, help="Independent starts per unit.")
@click.option("--seed", type=int, default=Settings.seed, show_default=True)
@click.option("--input-range", nargs=2, type=float, default=Settings.input_range, show_default=True,
              metavar="LO HI", help="Box constraint on the model's input tensor.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--atol", type=float, default=Settings.atol, show_default=True, help="Validation tolerance.")
@click.option("--rtol", type=float, default=Settings.rtol, show_default=True, help="Validation tolerance.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder [default: runs/MODEL-NODE-TIME].")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the results document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_input_options
def maximize(model, node, units, objective, position, method, backward_slope, steps, lr, optimizer, seeds, seed,
             input_range, device, atol, rtol, out, force, as_json, quiet, input_shapes, input_name):
    """Find inputs that drive units of MODEL highest, with ProxyGrad, validated by onnxruntime.

    MODEL defaults to the embedded digits CNN (models/digits_cnn.onnx).
    """
    from onnxproxy import run
    from onnxproxy.graph import parse_input_shape

    settings = Settings(steps=steps, lr=lr, optimizer=optimizer, backward_slope=backward_slope, seeds=seeds,
                        seed=seed, input_range=tuple(input_range), device=run.resolve_device(device),
                        atol=atol, rtol=rtol)
    request = run.Request(model, node, units, objective, _parse_position(position), method, settings, out, force,
                          quiet, parse_input_shape(input_shapes), input_name)
    document, folder = run.maximize(request, _warn)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo("\n".join(run.summary_lines(document)))
        click.echo(f"Wrote {folder}")
    if not document["validated"]:
        click.echo("FAILED: torch and onnxruntime disagree on some activations (see results.json)", err=True)
        sys.exit(1)


def _parse_position(text):
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--position {text}: expected integers like 3,4") from None


if __name__ == "__main__":
    main()
