"""Built-in tasks: tiny models and tokenizers built offline, with data to train on."""
