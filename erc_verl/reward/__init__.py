"""Rule-based rewards. `math_verify_score` is the paper's verifiable-math reward for verl."""
