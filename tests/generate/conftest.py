import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random llama with a BPE tokenizer (ChatML template) trained on the interpreter's own docs."""
    import pydoc_data.topics

    import lmstack
    from lmstack.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:40]), "bpe", 400)
    torch.manual_seed(0)
    model = lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=tokenizer.vocab_size,
                                               eos_token_id=tokenizer.eos_token_id))
    directory = tmp_path_factory.mktemp("tiny") / "model"
    lmstack.save_model(model, directory, extra_files=tokenizer.files())
    return directory


@pytest.fixture
def tiny(tiny_model_dir):
    """(model, tokenizer) loaded from tiny_model_dir."""
    import lmstack
    from lmstack.tokenizer import Tokenizer

    return lmstack.load_model(tiny_model_dir).eval(), Tokenizer.load(tiny_model_dir)


@pytest.fixture(scope="session")
def bos_llama_dir(tmp_path_factory):
    """A Llama-3-style model directory built locally: a byte-level BPE tokenizer whose `tok(text)` prepends
    BOS <|begin_of_text|> (and whose chat template, Llama 3's, writes bos_token itself), and a tiny random
    LlamaForCausalLM over its vocabulary, saved with transformers' save_pretrained."""
    import pydoc_data.topics

    from lmstack.tokenizer import SpecialTokens, train_tokenizer
    from tests.parity.hf_models import build_hf_model

    special = SpecialTokens(bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|pad|>")
    tokenizer = train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:40]), "bpe", 400,
                                special_tokens=special, chat_template="llama3")
    directory = tmp_path_factory.mktemp("bos_llama") / "model"
    # a large init: greedy continuations depend on every prompt token, BOS included
    build_hf_model("llama", directory, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def bos_llama(bos_llama_dir):
    """(transformers model, transformers tokenizer, lmstack model, lmstack tokenizer) from bos_llama_dir."""
    import transformers

    import lmstack
    from lmstack.tokenizer import Tokenizer

    reference = transformers.AutoModelForCausalLM.from_pretrained(bos_llama_dir, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(bos_llama_dir)
    return reference, hf_tokenizer, lmstack.load_model(bos_llama_dir).eval(), Tokenizer.load(bos_llama_dir)
