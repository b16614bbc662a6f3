"""Recipes: a typed config in, an Engine out. Each is short: it builds the model, the objective, the batch
source and the recipe's choices (what trains, the parameter groups, what a checkpoint holds) and hands
them to the one engine (lmstack.train.engine).

    pretrain.py   PretrainConfig -> causal-LM pretraining on token shards (`lmstack pretrain`, quickstart)
    finetune.py   FinetuneConfig -> instruction fine-tuning: full, LoRA, DoRA, QLoRA (`lmstack finetune`)
"""
