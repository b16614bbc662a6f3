import bz2

import pytest
import torch


@pytest.fixture(scope="session")
def hellaswag_lines(shared_data):
    with bz2.open(shared_data / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(1200)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, hellaswag_lines):
    """A tiny random llama (context 256) with a BPE tokenizer (BOS added by default) trained on HellaSwag text.
    init_std 0.1 makes its distributions peaked enough that choices differ clearly in log-likelihood."""
    import lmstack
    from lmstack.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(hellaswag_lines), "bpe", 600)
    torch.manual_seed(0)
    config = lmstack.preset("llama-tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id, max_seq_len=256, init_std=0.1)
    directory = tmp_path_factory.mktemp("eval") / "model"
    lmstack.save_model(lmstack.Transformer(config), directory, extra_files=tokenizer.files())
    return directory


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    import lmstack
    from lmstack.tokenizer import Tokenizer

    return lmstack.load_model(tiny_model_dir).eval(), Tokenizer.load(tiny_model_dir)


@pytest.fixture(scope="session")
def hellaswag_task(shared_data):
    from lmstack.eval.tasks import read_hellaswag

    return read_hellaswag(shared_data / "hellaswag" / "hellaswag_val_full.txt.bz2")
