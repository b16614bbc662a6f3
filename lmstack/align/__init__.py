"""Alignment helpers that are not training: reward functions, synthetic tasks, and the AI judge.

    rewards.py   verifiable reward functions (exact-match arithmetic, GSM8K `#### n` answers) and the guard
                 that drops (and counts) a sample whose reward function raises or returns NaN
    tasks.py     synthetic tasks with a known answer or rule, for tests, benchmarks and the example configs
    judge.py     a judge model (an lmstack model or an OpenAI-compatible URL): pair labelling for RLAIF, with
                 both orders, and win rates (ties half, length-controlled)

The training side (objectives, the rollout source, the recipe) is lmstack.train.
"""
