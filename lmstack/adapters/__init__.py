"""Adapters: parameter-efficient fine-tuning methods, swapped into a model by module name.

    config.py       LoraConfig (peft's fields)
    lora.py         LoraLinear: LoRA, rsLoRA and DoRA on any linear (dense or quantized base)
    modules.py      ModulesToSave, TrainableTokens (new tokens' rows), resize_vocab
    inject.py       apply_lora, merge / unmerge / unload, disable_adapters (a reference model for free)
    names.py        lmstack <-> Hugging Face module names (GPT-2's fused c_attn)
    peft_format.py  save_adapter / load_adapter in peft's directory format; AdapterStore for the engine
    prompt.py       prompt tuning and P-tuning (virtual tokens, through the model's kv_prefix)
    prefix.py       prefix tuning (trained keys/values in every layer, an MLP reparameterisation in training)
    ia3.py          IA3 (learned scaling of keys, values and the MLP's intermediate activation)
    bottleneck.py   bottleneck adapters (Houlsby / Pfeiffer placement; lmstack's own directory format)
    method_format.py  the directory format of those methods (peft's, except bottleneck)

    model = lmstack.load_model("base-dir")
    apply_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ... train ...
    save_adapter(model, "out/adapter")      # peft.PeftModel.from_pretrained(hf_base, "out/adapter") loads it
    model = lmstack.load_model("base-dir", adapter="out/adapter")
"""

from lmstack.adapters.bottleneck import BottleneckAdapter, BottleneckConfig
from lmstack.adapters.config import LoraConfig
from lmstack.adapters.ia3 import IA3Config, IA3Linear
from lmstack.adapters.inject import (
                                     adapters,
                                     apply_bottleneck,
                                     apply_ia3,
                                     apply_lora,
                                     disable_adapters,
                                     has_adapters,
                                     is_adapter_parameter,
                                     merge_adapters,
                                     train_new_rows,
                                     unload,
                                     unmerge_adapters,
)
from lmstack.adapters.lora import LoraLinear
from lmstack.adapters.modules import ModulesToSave, TrainableTokens, resize_vocab
from lmstack.adapters.peft_format import AdapterStore, is_adapter_dir, load_adapter, read_adapter, save_adapter
from lmstack.adapters.prefix import PrefixTuningConfig, apply_prefix_tuning
from lmstack.adapters.prompt import PromptTuningConfig, PTuningConfig, apply_p_tuning, apply_prompt_tuning

__all__ = ["AdapterStore", "BottleneckAdapter", "BottleneckConfig", "IA3Config", "IA3Linear", "LoraConfig", "LoraLinear",
           "ModulesToSave", "PTuningConfig", "PrefixTuningConfig", "PromptTuningConfig", "TrainableTokens", "adapters",
           "apply_bottleneck", "apply_ia3", "apply_lora", "apply_p_tuning", "apply_prefix_tuning", "apply_prompt_tuning",
           "disable_adapters", "has_adapters", "is_adapter_dir", "is_adapter_parameter", "load_adapter",
           "merge_adapters", "read_adapter", "resize_vocab", "save_adapter", "train_new_rows", "unload",
           "unmerge_adapters"]
