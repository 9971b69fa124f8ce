"""medscreen: the command line and the end-to-end demo (top floor, below only the DAGs)."""
__version__ = "0.1.0"
