"""Former home of ``dag-trl train``, kept so that existing imports and ``python -m dag_trl.demo.cli train`` work: the
command is :mod:`dag_trl.cli` now, and this module re-exports its entry points."""

from ..cli import BUILTIN_MODEL, ScriptArguments, build_trainer, main, parse_arguments, run

__all__ = ["BUILTIN_MODEL", "ScriptArguments", "build_trainer", "main", "parse_arguments", "run"]

if __name__ == "__main__":
    main()
