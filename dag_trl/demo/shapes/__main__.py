"""``python -m dag_trl.demo.shapes``: see :mod:`dag_trl.demo.shapes.cli`."""

from .cli import main

main()
