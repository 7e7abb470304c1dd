"""``grootl train``: fine-tune a Mamba model from a YAML recipe with Accelerate.

    grootl train RECIPE [key=value ...] [--resume | --overwrite]
    accelerate launch -m grootl.train RECIPE [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from grootl.cli import help_text
from grootl.train.recipe import Recipe, RecipeError, load_recipe, valid_keys

__all__ = ["Recipe", "RecipeError", "load_recipe", "main", "train", "valid_keys"]


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False):
    """Run a recipe; returns ``<output_dir>/final`` (see :func:`grootl.train.loop.train`)."""
    from grootl.train.loop import train as run

    return run(recipe, resume=resume, overwrite=overwrite)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grootl train",
        description=help_text(__doc__),
        epilog="Override any recipe key as key=value (dotted for nested keys), e.g. train.lr=1e-4 "
        "output_dir=runs/x. Relative paths in a recipe file resolve against the recipe's folder.",
    )
    parser.add_argument("recipe", help="YAML recipe file, e.g. recipes/tiny/cpu-demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in output_dir and start afresh")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from grootl.data import DataError
    from grootl.train.loop import LaunchError, TrainingError
    from grootl.train.rundir import RunDirError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.print_recipe:
            import yaml

            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            return 0
        train(recipe, resume=args.resume, overwrite=args.overwrite)
    except (RecipeError, DataError, RunDirError, TrainingError, LaunchError) as error:
        print(f"grootl train: error: {error}", file=sys.stderr)
        return 1
    return 0
