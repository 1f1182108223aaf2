"""Built-in tasks: tiny models and tokenizers built offline, with data to train on.

The names `model:` takes for them live here, where the run config and the memory estimate both read them.
"""

BUILTIN = "builtin"
CONSTRAINTS = "constraints"  # SmolLM2-135M-Instruct on verifiable constraints (selfalign.tasks.smollm2)
INSTRUCTIONS = "instructions"  # SmolLM2-135M-Instruct on the constraints widened toward IFEval (tasks.instructions)
TASKS = (BUILTIN, CONSTRAINTS, INSTRUCTIONS)
SMOLLM2 = "smollm2"  # not a task: SmolLM2-135M-Instruct alone, for a user's own prompts and judge
