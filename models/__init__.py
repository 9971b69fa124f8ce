"""Reference models (torch; the ``train`` extra). Nothing in the pipeline imports this at run time."""
