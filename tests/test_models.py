"""fastmem.load_model / save_model: Hugging Face folders, a tiny GGUF written here with the gguf package (and a
folder holding it), the hub cache (offline), and one-line errors for everything that is not a model."""
from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import LlamaConfig, LlamaForCausalLM

from fastmem.data import build_tokenizer
from fastmem.models import ModelLoadError, load_model, resolve_dtype, resolve_model, save_model

V5 = Version(transformers.__version__) >= Version("5.0.0")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_llama(vocab_size: int = 128, **config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, **config)).eval()


def _llama_cpp_permute(weight, heads: int):
    """llama.cpp's row order of q/k projections (its convert_hf_to_gguf `LlamaModel.permute`)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_gguf(path, model: LlamaForCausalLM) -> None:
    """``model`` as an fp32 llama GGUF (llama.cpp's tensor names and q/k order), with a byte-ish BPE vocabulary,
    special tokens ``<unk> <|im_start|> <|im_end|>`` and a chat template."""
    gguf = pytest.importorskip("gguf")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    tokens = ["<unk>", "<|im_start|>", "<|im_end|>"] + [chr(i) for i in range(33, 127)] + ["Ġ", "Ċ"]
    tokens += [f"tok{i}" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    weights = {name: value.detach().float().numpy() for name, value in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_output": "self_attn.o_proj",
             "attn_v": "self_attn.v_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weights[prefix + hf_name + ".weight"])
        writer.add_tensor(f"blk.{layer}.attn_q.weight",
                          _llama_cpp_permute(weights[prefix + "self_attn.q_proj.weight"], config.num_attention_heads))
        writer.add_tensor(f"blk.{layer}.attn_k.weight",
                          _llama_cpp_permute(weights[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def source_model():
    return tiny_llama(tie_word_embeddings=True)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, source_model):
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf"
    write_tiny_gguf(path, source_model)
    return path


IDS = torch.tensor([[1, 5, 9, 20, 40, 3, 77]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("spec", ["file", "folder"])
def test_gguf_loads_as_the_model_it_was_written_from(gguf_path, source_model, spec):
    model, tokenizer = load_model(gguf_path if spec == "file" else gguf_path.parent, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32 and not model.training
    assert torch.equal(logits(model), logits(source_model))
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    if V5:   # transformers 4.x reads this GGUF's padding token id as <|im_start|>
        assert tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_gguf_model_saves_as_a_folder_and_reloads_with_identical_logits(gguf_path, tmp_path):
    model, tokenizer = load_model(gguf_path, device="cpu")
    folder = save_model(model, tokenizer, tmp_path / "saved")
    assert (folder / "config.json").is_file() and not list(folder.glob("*.gguf"))
    reloaded, reloaded_tokenizer = load_model(folder, device="cpu")
    assert torch.equal(logits(reloaded), logits(model))
    text = "a b\nc <|im_end|>"
    assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template


@pytest.mark.skipif(not V5, reason="transformers 4.x saves GGUF-loaded models itself")
def test_transformers_alone_refuses_to_save_a_gguf_model(gguf_path, tmp_path):
    """What `save_model` works around on transformers 5 (if it starts saving these, `forget_gguf` can go)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with pytest.raises(ValueError, match="gguf"):
        model.save_pretrained(tmp_path / "refused")


def test_folder_dtype_padding_and_pad_token(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_model(str(tmp_path), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert loaded.padding_side == "left" and loaded.pad_token == loaded.eos_token
    default, _ = load_model(None, device="cpu")
    assert type(default).__name__ == "LlamaForCausalLM" and default.dtype == torch.float32


def test_hub_id_in_the_local_cache_loads_offline(tmp_path, monkeypatch):
    """A hub id resolves through the Hugging Face cache (HF_HUB_OFFLINE=1 in tests): a snapshot laid out there."""
    import huggingface_hub

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    tokenizer = build_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    import transformers.utils.hub

    monkeypatch.setattr(transformers.utils.hub, "HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(cache), raising=False)
    assert resolve_model("someone/tiny").kind == "hub"
    model, _ = load_model("someone/tiny", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_what_is_not_a_model_is_a_one_line_error(tmp_path, gguf_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.gguf").write_bytes(b"")
    (tmp_path / "two" / "b.gguf").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    cases = [
        (tmp_path / "missing", "no such file or folder"),
        ("./missing-model", "no such file or folder"),
        ("someone/not-cached-anywhere", "not in the Hugging Face cache; fastmem never downloads"),
        (tmp_path / "notes.txt", "not a .gguf file"),
        (tmp_path / "empty", "neither a config.json nor a .gguf"),
        (tmp_path / "two", "holds 2 .gguf files"),
        (tmp_path / "broken", "cannot"),
        (tmp_path / "junk.gguf", "cannot"),
    ]
    for spec, message in cases:
        with pytest.raises(ModelLoadError, match=message) as caught:
            load_model(spec, device="cpu")
        assert "\n" not in str(caught.value) and str(spec) in str(caught.value)


def test_bad_dtype_and_device_are_refused_before_loading(gguf_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(gguf_path, dtype="int8")
    with pytest.raises(ValueError, match="not a torch device"):
        load_model(gguf_path, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_model(gguf_path, device="cuda")
    assert resolve_dtype("auto") == "auto" and resolve_dtype(torch.float16) is torch.float16
