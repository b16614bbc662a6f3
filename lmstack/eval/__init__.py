"""Evaluation: perplexity, multiple choice, generation tasks, code execution, LLM-as-judge, reports.

Every task reads local files in their public formats (the package ships no benchmark data) and follows the
definitions of the tools papers use (lm-evaluation-harness, sacrebleu, rouge-score, human-eval). The model
is driven only through the CausalLM protocol (log-likelihoods) and the public `lmstack.generate`.
"""
