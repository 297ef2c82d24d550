"""finpulse: real-time financial news monitor that keeps learning (composition root: CLI, config, demo)."""

__version__ = "0.1.0"
