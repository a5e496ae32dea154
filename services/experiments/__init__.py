"""A/B experiments: arms (policy + weight), sticky assignment, exploration personas."""
