"""Operations on trained adapters: arithmetic (combine), hot swap, pruning, importance scores."""
