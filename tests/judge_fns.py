"""Reward functions named as 'tests.judge_fns:NAME' in the judge tests."""


def length(prompts, responses):
    return [float(len(r.split())) for r in responses]


def raises(prompts, responses):
    raise RuntimeError("scorer offline")


def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)


def nan(prompts, responses):
    return [float("nan")] * len(responses)


_pairwise_calls = []


def longer_wins(prompts, responses_a, responses_b):
    """P(a better than b) = 1 when a is longer, 0 when shorter, 0.5 on a tie; records each call's batch size."""
    _pairwise_calls.append(len(responses_a))
    return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(responses_a, responses_b)]


def longer_wins_per_pair(prompt, a, b):
    """The per-pair form pairwise functions had before they were called on batches."""
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


def slow_counting_gold(prompts, responses):
    """The built-in gold reward, after a pause, appending the number of labels it returned to
    $SELFALIGN_TEST_LABEL_LOG (the pause comes first, so a kill during it pays for nothing)."""
    import os
    import time

    from selfalign.tasks.builtin import gold_reward

    time.sleep(float(os.environ.get("SELFALIGN_TEST_JUDGE_DELAY", "0")))
    scores = gold_reward(prompts, responses)
    log = os.environ.get("SELFALIGN_TEST_LABEL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{len(scores)}\n")
    return scores


def gold_pairwise(prompts, responses_a, responses_b):
    """P(a better than b) from the built-in gold reward, per pair of the batch: 1, 0, or 0.5 on a tie."""
    from selfalign.tasks.builtin import gold_reward

    ra, rb = gold_reward(list(prompts), list(responses_a)), gold_reward(list(prompts), list(responses_b))
    return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(ra, rb)]


_calls = 0


def paid_then_killed(prompts, responses):
    """The built-in gold reward, paid for (logged to $SELFALIGN_TEST_LABEL_LOG) on every call; call number
    $SELFALIGN_TEST_KILL_AFTER_JUDGE_CALL then SIGKILLs the process before the loop can journal it: the
    worst moment for a paid judge."""
    import os
    import signal

    from selfalign.tasks.builtin import gold_reward

    global _calls
    _calls += 1
    scores = gold_reward(prompts, responses)
    with open(os.environ["SELFALIGN_TEST_LABEL_LOG"], "a") as f:
        f.write(f"{len(scores)}\n")
    if str(_calls) == os.environ.get("SELFALIGN_TEST_KILL_AFTER_JUDGE_CALL"):
        os.kill(os.getpid(), signal.SIGKILL)
    return scores


def ties_on_half(prompts, responses):
    """The built-in gold reward, but a constant 0.5 (every response tied) on about half the prompts."""
    import json
    import zlib

    from selfalign.tasks.builtin import gold_reward

    scores = gold_reward(prompts, responses)
    return [0.5 if zlib.crc32(json.dumps(p).encode()) % 2 else s for p, s in zip(prompts, scores)]


def pid_logging_gold(prompts, responses):
    """The built-in gold reward, appending "pid<TAB>labels" to $SELFALIGN_TEST_JUDGE_PIDS (which process judged)."""
    import os

    from selfalign.tasks.builtin import gold_reward

    scores = gold_reward(prompts, responses)
    with open(os.environ["SELFALIGN_TEST_JUDGE_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\t{len(scores)}\n")
    return scores


def logging_gold(prompts, responses):
    """The built-in gold reward, appending each (prompt, response) it is asked about to $SELFALIGN_TEST_JUDGED
    as a JSON line: what the judge saw, and so was paid for."""
    import json
    import os

    from selfalign.tasks.builtin import gold_reward

    with open(os.environ["SELFALIGN_TEST_JUDGED"], "a") as f:
        f.writelines(json.dumps([p, r]) + "\n" for p, r in zip(prompts, responses))
    return gold_reward(prompts, responses)
