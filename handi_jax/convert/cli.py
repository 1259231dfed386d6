"""`python -m handi_jax.convert {import,inspect}`: pipeline directories on the command line.

`import` rewrites a PyTorch pipeline directory (legacy .bin weights, a stock ModelScope UNet) as one that
`config.model.pretrained` reads: safetensors, the HANDI UNet in the release's keys. Export from a training run
is `python -m handi_jax.main --mode=export`.
"""

import argparse
import logging
import sys

from handi_jax.convert import pipeline


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m handi_jax.convert", description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="PyTorch pipeline directory -> pipeline directory handi-jax loads")
  imp.add_argument("source", help="diffusers pipeline directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
  imp.add_argument("destination", help="pipeline directory to write (safetensors)")
  imp.add_argument("--init_missing_handi_params", action="store_true",
                   help="a stock diffusers UNet (e.g. ModelScope): start the HANDI mask/motion parameters as the "
                        "stock model (conv_in2 from conv_in, zeros elsewhere)")
  imp.add_argument("--stock_unet", action="store_true", help="keep the stock diffusers UNet (no HANDI extension)")
  imp.add_argument("--unet_format", choices=("auto", "original", "diffusers"), default="auto",
                   help="UNet keys written: original (the HANDI release, keeps conv_in2/motion), diffusers (stock), "
                        "auto (original for a HANDI UNet, else diffusers)")
  ins = commands.add_parser("inspect", help="summarise a pipeline directory")
  ins.add_argument("directory")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if args.command == "import":
      pipeline.normalize_pipeline(args.source, args.destination, stock_unet=args.stock_unet,
                                  init_missing_handi_params=args.init_missing_handi_params,
                                  unet_format=args.unet_format)
      print(pipeline.describe_directory(args.destination))
    else:
      print(pipeline.describe_directory(args.directory))
  except (FileNotFoundError, ValueError) as e:  # CheckpointMismatchError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
