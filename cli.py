"""The onnxproxy command line: parses options, calls the library, prints. No logic of its own.

torch and onnx2torch are imported inside the commands that need them, so `--help` stays fast.
"""

import sys

import click

from onnxproxy import __version__
from onnxproxy.errors import UserError


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


if __name__ == "__main__":
    main()
