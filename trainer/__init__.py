"""spamfilterd-train: fine-tunes and evaluates the GPT spam classifier."""
