"""Quality heads (PRISM §3): hidden states → one logit per position; sigmoid = g_i, the predicted
probability that the token at position i is right given the rest of the sequence."""
