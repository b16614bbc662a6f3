import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one thread is faster than two and immune to OpenMP spin-waits when the
    machine is shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
