"""Reward functions named as 'tests.judge_fns:NAME' in the judge tests."""


def length(prompts, responses):
    return [float(len(r.split())) for r in responses]


def raises(prompts, responses):
    raise RuntimeError("scorer offline")


def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)


def nan(prompts, responses):
    return [float("nan")] * len(responses)


def longer_wins(prompt, a, b):
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5
