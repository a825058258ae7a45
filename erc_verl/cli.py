"""`erc-verl` console script: one sub-command per concern, each implemented in its own module."""

import importlib
import sys

# sub-command -> (module, function, one-line help). Modules are imported lazily: `import verl` costs seconds.
COMMANDS = {
    "train": ("erc_verl.runs.train", "main", "run a recipe (default: the tiny CPU run when no GPU is present)"),
    "recipes": ("erc_verl.runs.recipes", "list_main", "list the recipes with one line each"),
    "eval": ("erc_verl.runs.evaluate", "main", "avg@n / pass@k on AIME (or any verl parquet), paper-style table"),
    "data": ("erc_verl.data.prepare", "main", "prepare KlearReasoner-MathSub-30K / AIME 2024 / AIME 2025 as verl parquet"),
    "submit": ("erc_verl.runs.submit", "submit_main", "submit a recipe as a Ray job to a cluster"),
    "jobs": ("erc_verl.runs.submit", "jobs_main", "status | logs | stop of a submitted Ray job"),
}


def _usage() -> str:
    lines = ["usage: erc-verl <command> [args...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"erc-verl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), func)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
