"""Reference pages generated from the code: ``python -m harmonylite.docgen`` writes them,
``python -m harmonylite.docgen --check`` exits 1 naming each page that differs.

Each page is rendered by a function of the code it documents (the argument parsers, the
configuration dataclasses, the metrics registry, the health fields); a page that holds
hand-written text too has its generated part between ``<!-- BEGIN GENERATED name -->`` and
``<!-- END GENERATED name -->`` lines.
"""
