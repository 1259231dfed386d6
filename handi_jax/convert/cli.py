"""`python -m handi_jax.convert {import,inspect}`: pipeline directories on the command line.

`import` rewrites a PyTorch pipeline directory or Hugging Face repo id (legacy .bin weights, a stock ModelScope
UNet) as one that `config.model.pretrained` reads: safetensors, the HANDI UNet in the release's keys. Export
from a training run is `python -m handi_jax.main --mode=export`.

Subcommands with their own positional arguments are argparse's; the console, the log file and the one-line input
errors are handi_jax.command_line's, as for every command.
"""

import argparse

from handi_jax import command_line
from handi_jax.convert import pipeline


def main(argv: list[str] | None = None) -> None:
  """Run one subcommand; an input error exits with status 1 and one `error:` line."""
  shared = argparse.ArgumentParser(add_help=False)
  shared.add_argument("--workdir", default="runs/convert", help="the log goes to <workdir>/logs/")
  shared.add_argument("--traceback", action="store_true", help="show the traceback of an input error")
  parser = argparse.ArgumentParser(prog="python -m handi_jax.convert", description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", parents=[shared],
                            help="PyTorch pipeline directory -> pipeline directory handi-jax loads")
  imp.add_argument("source", help="diffusers pipeline directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/) "
                   "or Hugging Face repo id namespace/name[@revision]")
  imp.add_argument("destination", help="pipeline directory to write (safetensors)")
  imp.add_argument("--init_missing_handi_params", action="store_true",
                   help="a stock diffusers UNet (e.g. ModelScope): start the HANDI mask/motion parameters as the "
                        "stock model (conv_in2 from conv_in, zeros elsewhere)")
  imp.add_argument("--stock_unet", action="store_true", help="keep the stock diffusers UNet (no HANDI extension)")
  imp.add_argument("--unet_format", choices=("auto", "original", "diffusers"), default="auto",
                   help="UNet keys written: original (the HANDI release, keeps conv_in2/motion), diffusers (stock), "
                        "auto (original for a HANDI UNet, else diffusers)")
  ins = commands.add_parser("inspect", parents=[shared], help="summarise a pipeline directory")
  ins.add_argument("directory")
  args = parser.parse_args(argv)
  command_line.quiet_libraries()
  with command_line.exit_on_user_errors(args.traceback):
    print(f"full log in {command_line.setup_logging(args.workdir, 'convert')}")
    if args.command == "import":
      pipeline.normalize_pipeline(args.source, args.destination, stock_unet=args.stock_unet,
                                  init_missing_handi_params=args.init_missing_handi_params,
                                  unet_format=args.unet_format)
      print(pipeline.describe_directory(args.destination))
    else:
      print(pipeline.describe_directory(args.directory))
